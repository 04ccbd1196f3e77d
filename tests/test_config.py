"""The config mechanism every job uses: flags, presets, --config files, --dry-run, validation."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import pytest

from jobs import config as jc
from jobs.storage import S3Options
from tests.support import Commands


@dataclass(frozen=True, kw_only=True)
class InnerConfig:
    width: float = 1.0
    """Channel multiplier."""
    frozen: bool = True


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    src: str = ""
    """Input folder."""
    lr: float = 3e-5
    """Base learning rate."""
    lr_drop_steps: tuple[int, ...] = (200_000, 375_000)
    """Steps at which the learning rate drops."""
    decode: Literal["mode", "mean"] = "mean"
    limit: int | None = None
    bounds: tuple[float, float] | None = (0.0, 1.0)
    model: InnerConfig = field(default_factory=InnerConfig)
    s3: S3Options = field(default_factory=S3Options)

    def __post_init__(self) -> None:
        if self.lr < 0:
            raise ValueError(f"lr must be >= 0, got {self.lr}")


def fast() -> DemoConfig:
    """A quick run: python -m demo --preset fast
    (seconds).

    Details that --help leaves out."""
    return DemoConfig(lr=1e-3, model=InnerConfig(width=0.25))


PRESETS = jc.presets_of(fast)


def parse(*argv: str) -> DemoConfig:
    cfg, _ = jc.parse_config(DemoConfig, list(argv), presets=PRESETS, positionals=("src",))
    return cfg


def test_defaults_and_flags_of_every_kind() -> None:
    assert parse() == DemoConfig()
    cfg = parse(
        "images/", "--lr", "0.1", "--lr-drop-steps", "5", "7", "--decode", "mode",
        "--limit", "3", "--model.width", "0.5", "--no-model.frozen",
        "--s3.endpoint-url", "http://127.0.0.1:9000",
    )  # fmt: skip
    assert cfg == DemoConfig(
        src="images/", lr=0.1, lr_drop_steps=(5, 7), decode="mode", limit=3,
        model=InnerConfig(width=0.5, frozen=False), s3=S3Options(endpoint_url="http://127.0.0.1:9000"),
    )  # fmt: skip
    assert parse("--limit", "none").limit is None
    assert parse("--lr-drop-steps").lr_drop_steps == ()


def test_precedence_preset_then_file_then_flags(tmp_path) -> None:
    assert parse("--preset", "fast") == DemoConfig(lr=1e-3, model=InnerConfig(width=0.25))
    path = tmp_path / "c.yaml"
    path.write_text("lr: 0.5\nmodel:\n  frozen: false\n")
    # the file's nested keys go into the preset's nested config (its width kept)
    merged = parse("--preset", "fast", "--config", str(path))
    assert merged == DemoConfig(lr=0.5, model=InnerConfig(width=0.25, frozen=False))
    cfg = parse("--preset", "fast", "--config", str(path), "--model.width", "2", "--lr", "0.7")
    # and the flags win over both, whatever their place on the command line
    assert cfg == DemoConfig(lr=0.7, model=InnerConfig(width=2.0, frozen=False))
    first = parse("--lr", "0.7", "--preset", "fast", "--config", str(path))
    assert first.lr == 0.7


def test_a_config_file_is_validated_with_the_flags_over_it(tmp_path) -> None:
    """The flags are laid over the file before anything is checked: a file's value that
    the command line replaces is never validated on its own."""
    path = tmp_path / "c.yaml"
    path.write_text("lr: -1\nmodel:\n  width: 0.5\n")
    assert parse("--config", str(path), "--lr", "0.25", "--no-model.frozen") == DemoConfig(
        lr=0.25, model=InnerConfig(width=0.5, frozen=False)
    )


def test_a_config_file_in_a_bucket_is_read_with_the_flags_s3_options(
    s3_server, monkeypatch
) -> None:
    from jobs import storage

    endpoint = S3Options(endpoint_url=s3_server.endpoint_url)
    url = s3_server.url("configs", "c.yaml")
    storage.write_bytes(url, b"lr: 0.5\n", endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")  # nothing listens there
    cfg = parse("--config", url, "--s3.endpoint-url", s3_server.endpoint_url)
    assert cfg == DemoConfig(lr=0.5, s3=endpoint)


def test_saved_config_round_trips_through_config_flag(tmp_path) -> None:
    original = parse("x", "--lr", "0.25", "--lr-drop-steps", "1", "2", "--model.width", "0.5")
    for name in ("best.json", "best.yaml"):
        jc.save_config(original, str(tmp_path / name))
        assert parse("--config", str(tmp_path / name)) == original
    assert json.loads((tmp_path / "best.json").read_text())["lr_drop_steps"] == [1, 2]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--lr", "-1"], "lr must be >= 0"),
        (["--lr", "abc"], "invalid float value"),
        (["--decode", "median"], "invalid choice"),
        (["--preset", "nope"], "invalid choice"),
        (["--s3.endpoint-url", "ftp://x"], "endpoint_url must be http"),
        (["--no-such-flag"], "unrecognized arguments"),
    ],
)
def test_bad_values_exit_with_a_clear_message(argv, message, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        parse(*argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("lr: 1\nbatch: 4\n", "unknown config key(s) ['batch']"),
        ("model:\n  depth: 3\n", "unknown config key(s) ['model.depth']"),
        ("lr: 1\n1: 2\nbatch: 4\n", "unknown config key(s) ['1', 'batch']"),  # not a name
        ("model:\n  true: 1\n", "unknown config key(s) ['model.True']"),
        ("lr: fast\n", "lr: expected float"),
        ("model:\n  frozen: 3\n", "model.frozen: expected true or false"),
        ("lr_drop_steps: 5\n", "lr_drop_steps: expected a list"),
        ("- 1\n- 2\n", "must hold a mapping"),
        ("decode: median\n", "decode: "),  # not one of the Literal's values
        ("lr: null\n", "lr: expected float"),  # null only where a field is optional
        ("limit: true\n", "limit: expected int"),  # a bool is not an int
        ("lr: [1\n", "bad.yaml does not parse"),
        ("lr: 1e-3x\n", "lr: expected float"),
        ("lr: 1\nlr: 2\n", "bad.yaml: key 'lr' is given twice (line 2)"),
        ("model:\n  width: 1\n  width: 2\n", "key 'width' is given twice (line 3)"),
        ("limit: 010\n", "limit: expected int, got '010'"),  # YAML 1.1: octal 8
        ("lr_drop_steps: [1:30]\n", "expected int, got '1:30'"),  # YAML 1.1: base 60, 90
    ],
)
def test_bad_config_files_are_rejected(tmp_path, capsys, text, message) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SystemExit):
        parse("--config", str(path))
    assert message in capsys.readouterr().err


def test_a_json_key_given_twice_is_refused(tmp_path, capsys) -> None:
    path = tmp_path / "c.json"
    path.write_text('{"lr": 0.1, "model": {"width": 1, "width": 2}}')
    with pytest.raises(SystemExit):
        parse("--config", str(path))
    assert "c.json: key 'width' is given twice" in capsys.readouterr().err


def test_a_yaml_merge_key_is_not_a_key_given_twice(tmp_path, capsys) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("base: &base {lr: 0.5}\n<<: *base\nlr: 0.25\n")
    with pytest.raises(SystemExit):  # `base` is no field: the merge itself was read
        parse("--config", str(path))
    assert "unknown config key(s) ['base']" in capsys.readouterr().err
    path.write_text("<<: {lr: 0.5, lr_drop_steps: [3]}\nlr: 0.25\n")
    cfg = parse("--config", str(path))
    assert cfg.lr == 0.25 and cfg.lr_drop_steps == (3,)


def test_an_optional_tuple_is_cleared_by_none() -> None:
    assert parse("--bounds", "none").bounds is None
    assert parse("--bounds", "0.5", "2").bounds == (0.5, 2.0)
    assert parse().bounds == (0.0, 1.0)


def test_a_positional_given_as_a_flag_too_must_agree(capsys) -> None:
    assert parse("a").src == parse("--src", "a").src == parse("a", "--src", "a").src == "a"
    with pytest.raises(SystemExit):  # a stray word, as after a flag that takes none
        parse("--src", "images/", "--no-model.frozen", "no")
    assert "SRC given twice: 'no', and 'images/' by --src" in capsys.readouterr().err


def test_numbers_yaml_reads_as_text_are_numbers(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("lr: 3e-4\nlr_drop_steps: [5, 7]\n")  # YAML 1.1: 3e-4 is a string
    assert parse("--config", str(path)).lr == 3e-4


def test_missing_config_file_is_a_usage_error(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit):
        parse("--config", str(tmp_path / "absent.json"))
    assert "absent.json" in capsys.readouterr().err


def test_dry_run_prints_config_and_does_not_run(capsys) -> None:
    ran = []
    result = jc.run_cli(DemoConfig, ran.append, ["--dry-run", "--lr", "0.5"], presets=PRESETS)
    assert result is None and ran == []
    assert json.loads(capsys.readouterr().out)["lr"] == 0.5
    jc.run_cli(DemoConfig, ran.append, ["--lr", "0.5"], presets=PRESETS)
    assert ran == [DemoConfig(lr=0.5)]


def test_help_lists_field_docs_and_presets(capsys) -> None:
    with pytest.raises(SystemExit):
        parse("--help")
    out = " ".join(capsys.readouterr().out.split())
    assert "Steps at which the learning rate drops. (default: 200000 375000)" in out
    assert "--model.width" in out and "Channel multiplier." in out
    assert "Base learning rate. (default: 3e-05)" in out and "--limit LIMIT (default: none)" in out
    assert "AWS itself). (default" not in out  # a docstring that gives its default keeps it
    assert "fast: A quick run: python -m demo --preset fast (seconds)" in out  # 1st paragraph
    assert "Details" not in out
    assert "fast: A quick run" in out


@dataclass(frozen=True)
class _Percent:
    share: float = 0.6
    """Share of the images (60% by default) held out."""
    pattern: str = "%d.png"


def test_help_keeps_percent_signs_in_docs_and_defaults(capsys) -> None:
    """argparse formats help with %: a literal one in a docstring or a default is shown."""
    with pytest.raises(SystemExit):
        jc.parse_config(_Percent, ["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(60% by default)" in out and "(default: %d.png)" in out


def test_to_dict_gives_plain_json_data() -> None:
    """Tuples become lists: a config compares equal to itself read back from its file."""
    data = jc.to_dict(DemoConfig())
    assert isinstance(data["lr_drop_steps"], list) and json.loads(json.dumps(data)) == data


def test_from_dict_checks_types_without_argparse() -> None:
    assert jc.from_dict(DemoConfig, {"lr": 1}) == DemoConfig(lr=1.0)
    with pytest.raises(jc.ConfigError, match="expected int"):
        jc.from_dict(DemoConfig, {"limit": 2.5})
    with pytest.raises(ValueError, match="lr must be >= 0"):
        jc.from_dict(DemoConfig, {"lr": -2})
    assert jc.from_dict(DemoConfig, jc.to_dict(fast())) == fast()


JOBS = ["colorize", "evaluate", "prepare", "prior", "synthetic", "train", "tune"]


@pytest.fixture(scope="module")
def help_runs() -> Iterator[Commands]:
    runs = Commands({m: [sys.executable, "-m", f"jobs.{m}", "--help"] for m in JOBS})
    yield runs
    runs.close()


@pytest.mark.parametrize("module", JOBS)
def test_every_job_prints_its_help(module: str, help_runs: Commands) -> None:
    """Field docs are free text (a literal % among them): every job's --help renders."""
    status, out, err = help_runs.result(module)
    assert status == 0, err[-2000:]
    assert f"python -m jobs.{module}" in out and "--dry-run" in out
    if module == "tune":  # the training fields each trial sets: their flags said refused
        words = " ".join(out.split())
        assert "--train.lr TRAIN.LR refused: set by the job for each run; give --lrs" in words


def test_a_config_built_in_code_is_held_to_its_fields_choices() -> None:
    """A Literal field's value is checked by the config itself, not only when a file or the
    command line is read: `dataclasses.replace` (a search's trials) cannot pass a typo."""
    import dataclasses

    from jobs import colorize, evaluate, synthetic, train, tune

    cases = [
        (lambda: dataclasses.replace(train.ci(), decode="nvjpg"), "decode must be one of"),
        (lambda: dataclasses.replace(evaluate.EvaluateConfig(data="d", model="m"),
                                     precision="fp16"), "precision must be one of"),
        (lambda: colorize.ColorizeConfig(input="/a", output="/b", model="m", format="gif"),
         "format must be one of keep, jpeg, png, tiff, webp; got 'gif'"),
        (lambda: dataclasses.replace(tune.ci(), scheduler="hyperband"), "scheduler must be one"),
        (lambda: synthetic.SyntheticConfig(dst="/d", seed=-1), "seed must be >= 0, got -1"),
    ]  # fmt: skip
    for build, message in cases:
        with pytest.raises(ValueError, match=message):
            build()
