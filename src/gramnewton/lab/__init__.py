"""The experiment lab on top of the optimizer core: models, data sets, the training loop,
experiments, theory checks, baselines and the ``gramnewton`` command line.

Needs the ``lab`` extra (``pip install 'gramnewton[lab]'``: numpy, tqdm, matplotlib, Pillow,
scikit-learn, mlxtend); the core package :mod:`gramnewton` needs torch only.
"""
