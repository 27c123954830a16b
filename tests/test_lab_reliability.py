"""Bad input to the lab: the image cache, run folders, configs and the command line (issue 11, 6 and 8-12).

Each case is a row of "Data, runs and the command line" in docs/reliability.md.
"""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path

import pytest
import torch
from test_data import afad_tree

from gramnewton.damping import GainRatioDamping
from gramnewton.lab.cli import main
from gramnewton.lab.data import get_dataset
from gramnewton.lab.data.base import TensorRegressionDataset
from gramnewton.lab.data.registry import DATASETS
from gramnewton.lab.experiments.config import dumps, load_config, resolve
from gramnewton.lab.experiments.optimizers import build_optimizer
from gramnewton.lab.models import get_model
from gramnewton.metric import SecondMomentMetric

TINY = """
name = "tiny"
seed = 3
[model]
name = "mlp"
kwargs = { in_channels = 64, hidden = [16] }
[data]
name = "rotated-digits"
train_subset = 64
test_subset = 32
[optimizer]
name = "sgd"
lr = 0.05
[train]
batch_size = 32
epochs = 1
threads = 1
"""


@pytest.fixture
def tiny(tmp_path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    return path


def one_line_error(capsys) -> str:
    """The command's error output, checked to be exactly one line starting with ``error:``."""
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert "Traceback" not in captured.out + captured.err
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# ------------------------------------------------------------------ 6: the decoded-image cache


def _member_offset(path: Path, member: zipfile.ZipInfo) -> int:
    """Byte offset of ``member``'s data inside the zip file (after its local header)."""
    with path.open("rb") as f:
        f.seek(member.header_offset)
        header = f.read(30)
    name_length, extra_length = struct.unpack("<HH", header[26:30])
    return member.header_offset + 30 + name_length + extra_length


def test_cached_images_with_a_flipped_byte_are_rebuilt(tmp_path):
    afad_tree(tmp_path)
    cache_dir = tmp_path / "cache"
    first = get_dataset("afad-lite", root=str(tmp_path), cache_dir=str(cache_dir))
    (entry,) = cache_dir.glob("*.pt")
    # The images' storage is the zip member holding exactly (n, 3, 64, 64) uint8 bytes.
    size = first.inputs.numel()
    with zipfile.ZipFile(entry) as archive:
        (member,) = [m for m in archive.infolist() if "/data/" in m.filename and m.file_size >= size]
    data = bytearray(entry.read_bytes())
    data[_member_offset(entry, member) + 1000] ^= 0xFF
    entry.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="checksum"):
        again = get_dataset("afad-lite", root=str(tmp_path), cache_dir=str(cache_dir))
    torch.testing.assert_close(again.inputs, first.inputs)


def test_cache_entry_with_missing_keys_is_rebuilt(tmp_path):
    afad_tree(tmp_path)
    cache_dir = tmp_path / "cache"
    first = get_dataset("afad-lite", root=str(tmp_path), cache_dir=str(cache_dir))
    (entry,) = cache_dir.glob("*.pt")
    stored = torch.load(entry, weights_only=True)
    del stored["keep"]
    torch.save(stored, entry)
    with pytest.warns(UserWarning, match="missing keep"):
        again = get_dataset("afad-lite", root=str(tmp_path), cache_dir=str(cache_dir))
    torch.testing.assert_close(again.inputs, first.inputs)


def test_bad_cache_folder_is_one_line(tmp_path, capsys, tiny, monkeypatch):
    afad_tree(tmp_path)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("GRAMNEWTON_CACHE", str(blocker / "cache"))
    overrides = ["--set", "data.name=afad-lite", "--set", f"data.root={tmp_path}", "--set", "model.kwargs={}"]
    assert main(["train", str(tiny), "--out", str(tmp_path / "run"), *overrides]) != 0
    assert "cache folder" in one_line_error(capsys)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------- 8, 9: run folders and --resume


def test_non_empty_out_is_refused_and_kept(tmp_path, capsys, tiny):
    out = tmp_path / "run"
    assert main(["train", str(tiny), "--out", str(out)]) == 0
    before = snapshot(out)
    capsys.readouterr()
    assert main(["train", str(tiny), "--out", str(out), "--set", "optimizer.lr=0.1"]) != 0
    assert "--overwrite" in one_line_error(capsys)
    assert snapshot(out) == before
    assert main(["train", str(tiny), "--out", str(out), "--set", "optimizer.lr=0.1", "--overwrite"]) == 0
    assert load_config(out / "config.toml")["optimizer"]["lr"] == 0.1


def test_failed_set_up_leaves_the_old_run_resumable(tmp_path, capsys, tiny):
    out = tmp_path / "run"
    assert main(["train", str(tiny), "--out", str(out)]) == 0
    before = snapshot(out)
    capsys.readouterr()
    # passes the config checks, fails when the model is built
    assert main(["train", str(tiny), "--out", str(out), "--overwrite", "--set", "model.name=mlpp"]) != 0
    assert "mlpp" in one_line_error(capsys)
    assert snapshot(out) == before
    assert main(["train", str(tiny), "--out", str(out), "--resume", "--set", "train.epochs=2"]) == 0


def test_resume_without_checkpoint_says_so(tmp_path, capsys, tiny):
    assert main(["train", str(tiny), "--out", str(tmp_path / "new"), "--resume"]) == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if "no checkpoint" in line]
    assert len(notes) == 1 and "from scratch" in notes[0]


# ------------------------------------------------------------------- 10, 11: configs


@pytest.mark.parametrize(
    "override, named",
    [
        ("trian.epochs=3", "did you mean train"),
        ("train.epoch=3", "did you mean train.epochs"),
        ("optimizer.lrr=0.1", "did you mean optimizer.lr"),
        ("optimizer.weight_decay=0.1", "train.weight_decay"),
        ("optimizer.lr=abc", "optimizer.lr must be a number"),
        ("train.epochs=-1", "train.epochs must be an integer >= 1"),
        ("train.batch_size=0", "train.batch_size must be an integer >= 1"),
        ("train.eval_every=0", "train.eval_every must be an integer >= 1"),
        ("train.weight_decay=abc", "train.weight_decay must be a number"),
        ("seed=1.5", "seed must be an integer"),
        ("optimizer.name=sdg", "did you mean sgd"),
    ],
)
def test_bad_config_values_are_refused_naming_the_key(tmp_path, capsys, tiny, override, named):
    assert main(["train", str(tiny), "--out", str(tmp_path / "run"), "--set", override]) != 0
    assert named in one_line_error(capsys)
    assert not (tmp_path / "run").exists()


def test_unknown_section_in_the_file_is_refused(tmp_path):
    path = tmp_path / "typo.toml"
    path.write_text(TINY + "\n[trian]\nepochs = 2\n")
    with pytest.raises(ValueError, match=r"unknown config key trian \(did you mean train\?\)"):
        load_config(path)


def test_ggn_keys_come_from_its_constructor():
    base = {"model": {"name": "mlp"}, "data": {"name": "rotated-digits"}}
    config = resolve(
        {**base, "optimizer": {"name": "ggn", "momentum": 0.0, "alpha": 0.3, "adaptive_damping": True, "lam": 2}}
    )
    assert config["optimizer"]["lam"] == 2
    with pytest.raises(ValueError, match="adaptive_damping must be true or false"):
        resolve({**base, "optimizer": {"name": "ggn", "momentum": 0.0, "adaptive_damping": "yes"}})
    with pytest.raises(ValueError, match="did you mean optimizer.alpha"):
        resolve({**base, "optimizer": {"name": "ggn", "momentum": 0.0, "alpah": 0.3}})
    # an argument whose default is None is typed by its annotation (max_step_norm: float | None)
    with pytest.raises(ValueError, match="optimizer.max_step_norm must be a number"):
        resolve({**base, "optimizer": {"name": "ggn", "max_step_norm": "8"}})


GGN_WITH_A_FLOOR = """
[optimizer]
name = "ggn"
[optimizer.adaptive_damping]
name = "gain_ratio"
check_every = 4
min_alpha = 1
"""


def test_a_damping_table_builds_that_rule_and_trains_and_resumes(tmp_path, tiny):
    """``[optimizer.adaptive_damping]``: the rule with those arguments, through a run and its resume."""
    path = tmp_path / "floor.toml"
    path.write_text(tiny.read_text().replace('[optimizer]\nname = "sgd"\nlr = 0.05\n', "") + GGN_WITH_A_FLOOR)
    config = load_config(path)
    assert config["optimizer"]["adaptive_damping"] == {"name": "gain_ratio", "check_every": 4, "min_alpha": 1}
    model = get_model("mlp", in_channels=64, hidden=(16,))
    rule = build_optimizer(config["optimizer"], model).damping
    assert (type(rule), rule.min_alpha, rule.check_every, rule.low) == (GainRatioDamping, 1, 4, GainRatioDamping.low)
    out = tmp_path / "run"
    assert main(["train", str(path), "--out", str(out)]) == 0
    assert load_config(out / "config.toml") == config
    assert main(["train", str(path), "--out", str(out), "--resume", "--set", "train.epochs=2"]) == 0


GGN_IN_A_METRIC = """
[optimizer]
name = "ggn"
[optimizer.metric]
name = "second_moment"
power = 0.75
"""


def test_a_metric_table_trains_and_resumes_with_its_second_moment(tmp_path, tiny):
    """``[optimizer.metric]``: the metric with its arguments, through a run and a resume that
    continues from the checkpoint's second moment."""
    path = tmp_path / "metric.toml"
    path.write_text(tiny.read_text().replace('[optimizer]\nname = "sgd"\nlr = 0.05\n', "") + GGN_IN_A_METRIC)
    config = load_config(path)
    model = get_model("mlp", in_channels=64, hidden=(16,))
    assert build_optimizer(config["optimizer"], model).metric == SecondMomentMetric(power=0.75)
    out = tmp_path / "run"
    assert main(["train", str(path), "--out", str(out)]) == 0
    assert main(["train", str(path), "--out", str(out), "--resume", "--set", "train.epochs=2"]) == 0
    with pytest.raises(ValueError, match="optimizer.metric: Invalid metric power: 3"):
        resolve({**config, "optimizer": {"name": "ggn", "metric": {"name": "second_moment", "power": 3}}})
    with pytest.raises(ValueError, match="optimizer.metric: unknown metric 'adam'"):
        resolve({**config, "optimizer": {"name": "ggn", "metric": "adam"}})


@pytest.mark.parametrize(
    "table, message",
    [
        (
            {"name": "gain_ratio", "min_alfa": 1.0},
            r"optimizer.adaptive_damping.min_alfa \(did you mean optimizer.adaptive_damping.min_alpha\?\)",
        ),
        ({"name": "cross_validated", "span": [1e-5, 1.0]}, "cross_validated accepts smoothing, points, max_samples"),
        ({"min_alpha": 1.0}, "optimizer.adaptive_damping.name must be one of gain_ratio, cross_validated, got None"),
        ({"name": "gain_ratio", "check_every": 2.5}, "optimizer.adaptive_damping.check_every must be an integer"),
        ({"name": "gain_ratio", "check_every": True}, "optimizer.adaptive_damping.check_every must be an integer"),
        ({"name": "gain_ratio", "min_alpha": "1"}, "optimizer.adaptive_damping.min_alpha must be a number"),
        ({"name": "gain_ratio", "subset": 0}, r"optimizer.adaptive_damping: Invalid subset: 0"),
        ({"name": "gain_ratio", "low": 0.9}, r"optimizer.adaptive_damping: need 0 <= low < high"),
    ],
)
def test_a_bad_damping_table_is_refused_naming_the_key(table, message):
    base = {"model": {"name": "mlp"}, "data": {"name": "rotated-digits"}}
    with pytest.raises(ValueError, match=message):
        resolve({**base, "optimizer": {"name": "ggn", "adaptive_damping": table}})


_EMPTY_TEST = "empty-test-split"


def _no_test_sample(root=None, split="train", seed=0):
    n = 8 if split == "train" else 0
    return TensorRegressionDataset(torch.randn(n, 4), torch.randn(n), name=_EMPTY_TEST)


def test_split_without_samples_is_refused(tmp_path, capsys, tiny, monkeypatch):
    monkeypatch.setitem(DATASETS._builders, _EMPTY_TEST, _no_test_sample)  # registered for this test only
    overrides = ["--set", f"data.name={_EMPTY_TEST}", "--set", "model.kwargs={ in_channels = 4 }"]
    overrides += ["--set", "data.test_subset=0"]
    assert main(["train", str(tiny), "--out", str(tmp_path / "run"), *overrides]) != 0
    assert "no test sample" in one_line_error(capsys)
    assert not (tmp_path / "run").exists()


def test_string_with_a_newline_round_trips_and_resumes(tmp_path, tiny):
    config = load_config(tiny, ['name="two\\nlines \\"quoted\\""'])
    assert config["name"] == 'two\nlines "quoted"'
    (tmp_path / "saved.toml").write_text(dumps(config))
    assert load_config(tmp_path / "saved.toml") == config
    out = tmp_path / "run"
    assert main(["train", str(tiny), "--out", str(out), "--set", 'name="a\\nb"']) == 0
    assert (
        main(["train", str(tiny), "--out", str(out), "--set", 'name="a\\nb"', "--set", "train.epochs=2", "--resume"])
        == 0
    )


# -------------------------------------------------------------- 12: every CLI error is one line


def _garbage(path: Path) -> None:
    path.write_bytes(b"not a checkpoint at all")


def _truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:200])


@pytest.mark.parametrize("damage, named", [(_garbage, "not a readable checkpoint"), (_truncated, "not a readable")])
def test_damaged_checkpoint_is_one_line(tmp_path, capsys, tiny, damage, named):
    out = tmp_path / "run"
    assert main(["train", str(tiny), "--out", str(out)]) == 0
    damage(out / "checkpoint.pt")
    capsys.readouterr()
    assert main(["train", str(tiny), "--out", str(out), "--resume", "--set", "train.epochs=2"]) != 0
    assert named in one_line_error(capsys)


def test_checkpoint_of_another_config_is_one_line(tmp_path, capsys, tiny):
    out = tmp_path / "run"
    assert main(["train", str(tiny), "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["train", str(tiny), "--out", str(out), "--resume", "--set", "optimizer.lr=0.2"]) != 0
    assert "another config" in one_line_error(capsys)


@pytest.mark.parametrize(
    "args, named",
    [
        (["train", "no_such_config"], "no config file no_such_config"),
        (["train", "{bad}", "--set", "model.name=nope"], "unknown model 'nope'"),
        (["train", "{bad}", "--set", "data.name=nope"], "unknown dataset 'nope'"),
        (["train", "{bad}", "--out", "{file}"], "is a file"),
        (["train", "{toml}"], "not valid TOML"),
        (["train", "{bad}", "--set", "data.name=afad-lite", "--set", "data.root={tmp}"], "no <age>"),
        (["plot", "{tmp}/no-run"], "no metrics.csv"),
        (["demo", "--dataset", "nope", "--seconds", "0.1"], "unknown dataset 'nope'"),
        # were a TypeError at the table ("unsupported format string"), or a crash in training
        (["demo", "--seconds", "-1", "--out", "{tmp}/d"], "seconds must be > 0, got -1.0"),
        (["demo", "--batch-size", "0", "--out", "{tmp}/d"], "batch_size must be > 0"),
        (["demo", "--out", "{file}"], "is a file, not a folder"),
        (["reproduce", "fig1", "--afad", "{tmp}/nope", "--out", "{tmp}/rep"], "is not a folder"),
        (
            ["theory", "quadratic", "--act", "nope", "--widths", "4", "--n", "4", "--out", "{tmp}/th"],
            "unknown activation",
        ),
        (["theory", "quadratic", "--widths", "abc"], "invalid"),
        # were an IndexError and a TypeError from inside the study
        (["theory", "quadratic", "--widths", "4", "--n", "0", "--out", "{tmp}/th"], "--n: must be an integer >= 1"),
        (["theory", "quadratic", "--widths", "-4", "--out", "{tmp}/th"], "at least one log2 width, each >= 0"),
    ],
)
def test_cli_errors_are_one_line(tmp_path, capsys, tiny, args, named):
    (tmp_path / "file").write_text("")
    (tmp_path / "broken.toml").write_text("[model\nname = 1")
    values = {"bad": str(tiny), "file": str(tmp_path / "file"), "toml": str(tmp_path / "broken.toml")}
    values["tmp"] = str(tmp_path)
    args = [a.format(**values) for a in args]
    if args[0] == "train" and "--out" not in args:
        args += ["--out", str(tmp_path / "out")]
    assert main(args) != 0
    assert named in one_line_error(capsys)


def test_the_demo_replaces_an_earlier_demo_but_not_a_training_run(tmp_path, capsys, tiny):
    """``gramnewton demo --out`` a ``gramnewton train`` run folder overwrote its metrics.csv (and put
    a curves.png beside its checkpoint); it is refused before any training, the run intact. A
    folder holding an earlier demo's two files alone is replaced, as ``make demo`` reruns do."""
    run = tmp_path / "run"
    assert main(["train", str(tiny), "--out", str(run)]) == 0
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    capsys.readouterr()
    assert main(["demo", "--dataset", "rotated-digits", "--seconds", "0.2", "--out", str(run)]) != 0
    assert "holds other files than a demo's (checkpoint.pt, config.toml)" in one_line_error(capsys)
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    demo = tmp_path / "demo"
    for _ in range(2):
        assert main(["demo", "--dataset", "rotated-digits", "--seconds", "0.2", "--out", str(demo)]) == 0
    assert sorted(p.name for p in demo.iterdir()) == ["curves.png", "metrics.csv"]


def test_debug_shows_the_traceback(tmp_path, tiny):
    with pytest.raises(ValueError, match="unknown model"):
        main(["train", str(tiny), "--out", str(tmp_path / "run"), "--set", "model.name=nope", "--debug"])
    with pytest.raises(ValueError, match="unknown model"):
        main(["--debug", "train", str(tiny), "--out", str(tmp_path / "run"), "--set", "model.name=nope"])
