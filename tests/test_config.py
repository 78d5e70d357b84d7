"""Typed configs: YAML + key=value overrides, and clear errors for unknown or ill-typed keys."""

import dataclasses

import pytest

from neo_jax.config import ConfigError, MeshConfig, load_config


@dataclasses.dataclass(frozen=True)
class Optim:
    lr: float = 1e-3
    warmup_steps: int = 10


@dataclasses.dataclass(frozen=True)
class Example:
    name: str = "run"
    steps: int = 100
    bf16: bool = False
    mix: dict[str, float] = dataclasses.field(default_factory=dict)
    levels: tuple[int, ...] = (256, 256)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    optim: Optim = dataclasses.field(default_factory=Optim)


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 5\noptim:\n  lr: 0.1\nmesh:\n  data: 2\nmix: {recommend: 1.0}\n")
    cfg = load_config(Example, path, ["optim.lr=3e-4", "bf16=true", "levels=[4,4,8]", "mesh.fsdp=4"])
    assert cfg.steps == 5
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.bf16 is True
    assert cfg.levels == (4, 4, 8)
    assert cfg.mesh == MeshConfig(data=2, fsdp=4, tensor=1)
    assert cfg.mix == {"recommend": 1.0}


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1", "unknown setting 'optim.lrr'; did you mean 'lr'?"),
    ("stpes=3", "unknown setting 'stpes'; did you mean 'steps'?"),
    ("steps=1.5", "steps: expected an integer"),
    ("bf16=maybe", "bf16: expected true or false"),
    ("steps", "is not of the form key=value"),
    ("levels=[8,8", r"override 'levels=\[8,8': not a valid YAML list or mapping \(expected ',' or '\]'"),
])
def test_bad_override_names_the_setting(override, message):
    with pytest.raises(ConfigError, match=message.replace("?", r"\?").replace("'", "'")):
        load_config(Example, None, [override])


def test_unknown_key_in_yaml_names_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  warmup_step: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown setting 'optim.warmup_step'; did you mean 'warmup_steps'"):
        load_config(Example, path)


def test_invalid_yaml_is_one_line_with_line_and_column(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("steps: 3\nlevels: [1, 2\nbf16: true\n")
    with pytest.raises(ConfigError) as error:
        load_config(Example, path)
    message = str(error.value)
    assert message.startswith(f"{path}:3:5: not valid YAML (") and "\n" not in message


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Example, tmp_path / "nope.yaml")
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(Example, path)


@dataclasses.dataclass(frozen=True)
class Required:
    hidden: int
    layers: int = 2


def test_missing_required_setting_is_named(tmp_path):
    path = tmp_path / "model.yaml"
    path.write_text("layers: 3\n")
    with pytest.raises(ConfigError, match=r"model.yaml: missing required setting 'hidden'"):
        load_config(Required, path)


def _section_leaves(config, prefix=""):
    """(dotted name, value) of the first scalar setting of every nested section of `config`."""
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if dataclasses.is_dataclass(value):
            scalars = [f.name for f in dataclasses.fields(value)
                       if isinstance(getattr(value, f.name), (bool, int, float, str))]
            if scalars:
                yield f"{prefix}{field.name}.{scalars[0]}", getattr(value, scalars[0])
            yield from _section_leaves(value, f"{prefix}{field.name}.")


def _config_classes():
    from neo_jax.baselines.train import SasRecTrainConfig
    from neo_jax.bench.rec import RecBenchConfig
    from neo_jax.catalog.commands import SidsBuildConfig
    from neo_jax.quickstart import QuickstartConfig
    from neo_jax.train.config import TrainConfig
    return [QuickstartConfig, RecBenchConfig, SidsBuildConfig, SasRecTrainConfig, TrainConfig]


@pytest.mark.parametrize("cls", _config_classes(), ids=lambda cls: cls.__name__)
def test_an_override_changes_only_the_setting_it_names(cls):
    """Overriding one setting of a section (with its own value) leaves the whole config at its
    defaults: the rest of the section is the enclosing config's default, not the section class's
    (the quickstart's `embedding` is fused, `EmbeddingConfig()`'s is not)."""
    defaults = cls()
    leaves = list(_section_leaves(defaults))
    assert leaves, cls.__name__
    for dotted, value in leaves:
        text = str(value).lower() if isinstance(value, bool) else str(value)
        assert load_config(cls, None, [f"{dotted}={text}"]) == defaults, dotted


def test_an_override_keeps_the_file_values_of_its_section(tmp_path):
    from neo_jax.quickstart import QuickstartConfig
    path = tmp_path / "qs.yaml"
    path.write_text("embedding:\n  text_encoder: minilm\n  collab:\n    dim: 48\n")
    config = load_config(QuickstartConfig, path, ["embedding.collab.epochs=1"])
    assert (config.embedding.source, config.embedding.text_encoder) == ("fused", "minilm")  # default, file
    assert (config.embedding.collab.dim, config.embedding.collab.epochs) == (48, 1)  # file, override
    assert config.embedding.text.dim == 128  # the quickstart's own default, not TextEncoderConfig's 256
