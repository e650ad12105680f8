"""Config composition, unknown keys, typed booleans, instantiate, the registry and script --help."""

import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from sat.arguments import config_parser, parse_config, split_overrides
from sat.config import ConfigError, instantiate, load_config
from sgm.registry import ARCHITECTURES, DType, ModelConfig, build_dit_from_config, resolve_arch

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Inner:
    steps: int = 50
    enabled: bool = True
    sampler: dict = field(default_factory=dict)


@dataclass
class Schema:
    name: str = "default"
    scale: float = 6.0
    inner: Inner = field(default_factory=Inner)
    model: ModelConfig = field(default_factory=ModelConfig)


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_files_compose_left_to_right_then_overrides(tmp_path):
    a = write(tmp_path, "a.yaml", "name: first\nscale: 2.0\ninner:\n  steps: 10\n")
    b = write(tmp_path, "b.yaml", "name: second\ninner:\n  enabled: false\n")
    config = load_config(Schema, [a, b], ["inner.steps=7", "model.name=kaleido-14b"])
    assert (config.name, config.scale, config.inner.steps, config.inner.enabled) == ("second", 2.0, 7, False)
    assert config.model.name == "kaleido-14b"


def test_unknown_key_names_key_and_file(tmp_path):
    good = write(tmp_path, "good.yaml", "scale: 1.0\n")
    bad = write(tmp_path, "bad.yaml", "inner:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown key 'inner\.stepz'"):
        load_config(Schema, [good, bad])
    with pytest.raises(ConfigError, match=r"<command line>: unknown key 'model\.arch\.num_layer'"):
        load_config(Schema, [good], ["model.arch.num_layer=3"])


@pytest.mark.parametrize(
    "text, expected", [("False", False), ("false", False), ("no", False), ("True", True), ("on", True)]
)
def test_booleans_are_typed(tmp_path, text, expected):
    path = write(tmp_path, "b.yaml", f"inner:\n  enabled: '{text}'\n")
    assert load_config(Schema, [path]).inner.enabled is expected
    assert load_config(Schema, [], [f"inner.enabled={text}"]).inner.enabled is expected


def test_bad_values_and_files_are_clear(tmp_path):
    bad_type = write(tmp_path, "t.yaml", "inner:\n  steps: many\n")
    with pytest.raises(ConfigError, match=r"t\.yaml: bad value for 'inner\.steps'"):
        load_config(Schema, [bad_type])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(Schema, [tmp_path / "missing.yaml"])
    broken = write(tmp_path, "broken.yaml", "a: [1, 2\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: invalid YAML"):
        load_config(Schema, [broken])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(Schema, [], ["steps"])
    with pytest.raises(ConfigError, match="model.dtype"):
        load_config(Schema, [], ["model.dtype=fp8"])


class Sampler:
    def __init__(self, num_steps: int, shift: float = 7.0):
        self.num_steps, self.shift = num_steps, shift


def test_instantiate_checks_the_signature():
    target = f"{__name__}.Sampler"
    built = instantiate({"target": target, "params": {"num_steps": 4}})
    assert (built.num_steps, built.shift) == (4, 7.0)
    with pytest.raises(ConfigError, match=r"sampling\.sampler: bad params .*shfit"):
        instantiate({"target": target, "params": {"num_steps": 4, "shfit": 5}}, where="sampling.sampler")
    with pytest.raises(ConfigError, match="missing a required argument"):
        instantiate({"target": target, "params": {}})
    with pytest.raises(ConfigError, match="has no attribute"):
        instantiate({"target": f"{__name__}.Nope"})
    with pytest.raises(ConfigError, match="unknown key"):
        instantiate({"target": target, "parms": {}})


def test_argument_parser_base_alias_and_overrides(tmp_path):
    path = write(tmp_path, "a.yaml", "scale: 3.0\n")
    parser = config_parser("test")
    _, config = parse_config(parser, Schema, ["--base", str(path), "inner.steps=4", "name=x"])
    assert (config.scale, config.inner.steps, config.name) == (3.0, 4, "x")
    assert split_overrides(["a.yaml", "k=v"], ["m=n"]) == (["a.yaml"], ["k=v", "m=n"])
    with pytest.raises(SystemExit) as info:
        parse_config(config_parser("test"), Schema, ["--config", str(path), "nope=1"])
    assert info.value.code == 2


def test_registry_resolves_names_dicts_and_overrides():
    assert resolve_arch("kaleido-14b") is ARCHITECTURES["kaleido-14b"]
    assert resolve_arch("kaleido-14b").time_embed_dim == 5120
    assert resolve_arch("kaleido-tiny", {"num_layers": 1, "hidden_size": None}).num_layers == 1
    with pytest.raises(ValueError, match="unknown architecture 'kaleido-15b'"):
        resolve_arch("kaleido-15b")
    with pytest.raises(ValueError, match=r"unknown architecture field\(s\) \['layers'\]"):
        resolve_arch({"layers": 2})
    with pytest.raises(ValueError, match="not divisible"):
        resolve_arch("kaleido-tiny", {"num_attention_heads": 5})


def test_model_configs_in_the_repo_build(tmp_path):
    for name, expected in (("kaleido_tiny.yaml", "kaleido-tiny"), ("kaleido_14b.yaml", "kaleido-14b")):
        config = load_config(Schema, [ROOT / "configs" / "model" / name])
        assert config.model.name == expected
    config = load_config(Schema, [ROOT / "configs/model/kaleido_14b.yaml"])
    assert config.model.dtype is DType.bfloat16
    model = build_dit_from_config(config.model, device="meta")
    assert model.dtype.is_floating_point and model.config.num_layers == 40


PROGRAMS = sorted(
    str(p.relative_to(ROOT))
    for pattern in ("*.py", "tools/*.py", "benchmarks/*.py")
    for p in ROOT.glob(pattern)
    if 'if __name__ == "__main__":' in p.read_text()
)


def test_every_script_tool_and_benchmark_has_help(monkeypatch, capsys):
    """``--help`` of each program, run as ``__main__`` in this process: exit 0, a usage line and the
    first line of the program's docstring (all of them are found, not listed by hand)."""
    import ast
    import runpy

    assert {"sample_video.py", "train_video_concat.py", "merge_kaleido.py", "tools/convert.py"} <= set(PROGRAMS)
    monkeypatch.chdir(ROOT)
    for program in PROGRAMS:
        first_line = ast.get_docstring(ast.parse((ROOT / program).read_text())).splitlines()[0]
        monkeypatch.setattr(sys, "argv", [program, "--help"])
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_path(str(ROOT / program), run_name="__main__")
        out = capsys.readouterr().out
        assert exit_info.value.code == 0, program
        assert out.startswith("usage:") and first_line in out, program


def test_scripts_reject_unknown_keys_naming_them():
    argv = [
        sys.executable,
        "sample_video.py",
        "--config",
        "configs/model/kaleido_tiny.yaml",
        "configs/sampling/tiny.yaml",
    ]
    bad = subprocess.run(argv + ["num_stepz=2"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "<command line>: unknown key 'num_stepz'" in bad.stderr
