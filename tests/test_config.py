"""The config schema: defaults, overrides, clear errors, resolved params."""

from __future__ import annotations

from pathlib import Path

import pytest

from recon.config import Config, ConfigError, MethodConfig, flatten, load_config, parse_override

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["default.yaml", "demo.yaml"])
def test_shipped_configs_validate(name):
    cfg = load_config(ROOT / "configs" / name, base_dir=ROOT)
    assert {o.name for o in cfg.reconstruct.operators} == {"mask", "blur", "fourier"}
    assert [i.name for i in cfg.compare.integrators][:4] == ["euler", "heun", "dpmpp2s", "ddim"]
    assert cfg.work_dir.is_absolute() and cfg.data.manifest.is_absolute()
    assert cfg.data.cache_dir == cfg.work_dir / "cache"


def test_demo_config_is_small():
    cfg = load_config(ROOT / "configs" / "demo.yaml", base_dir=ROOT)
    assert cfg.data.image_size is None and cfg.data.max_slices <= 16  # native matrix
    assert cfg.prior.checkpoint.name == "prior_native.pt" and cfg.reconstruct.x0_range
    assert cfg.reconstruct.steps <= 32 and 2 <= cfg.reconstruct.n_samples <= 4
    assert cfg.train.enabled is False


def test_overrides_dotted_yaml_values_and_short_forms(tmp_path):
    cfg = load_config(None, ["reconstruct.steps=12", "reconstruct.integrator=ddim",
                             "reconstruct.integrator.params.eta=0.5",
                             "reconstruct.operators=[mask, {name: fourier, params: {acceleration: 8}}]",
                             "compare.steps=[4, 8]", "tracking.experiment=x y"], base_dir=tmp_path)
    assert cfg.reconstruct.steps == 12
    assert cfg.reconstruct.integrator.name == "ddim" and cfg.reconstruct.integrator.params == {"eta": 0.5}
    assert cfg.reconstruct.integrator.label == "ddim(eta=0.5)"
    assert [o.name for o in cfg.reconstruct.operators] == ["mask", "fourier"]
    assert cfg.reconstruct.operators[1].params == {"acceleration": 8}
    assert cfg.compare.steps == [4, 8] and cfg.tracking.experiment == "x y"
    assert cfg.work_dir == (tmp_path / "work").resolve()
    # list items by index
    cfg = load_config(None, ["reconstruct.operators=[mask, blur]", "reconstruct.operators.1.params.sigma=2"])
    assert cfg.reconstruct.operators[1].params == {"sigma": 2}


def test_resolved_is_flat_and_complete():
    cfg = load_config(None, ["reconstruct.operators=[fourier]"])
    flat = cfg.resolved()
    assert flat["reconstruct.steps"] == cfg.reconstruct.steps
    assert flat["reconstruct.operators.0.name"] == "fourier"
    assert flat["compare.steps"] == [8, 16, 32]
    assert all(not isinstance(v, dict) or v == {} for v in flat.values())
    assert flatten({"a": {"b": 1}, "l": [{"x": 2}], "e": {}}) == {"a.b": 1, "l.0.x": 2, "e": {}}
    # the dict round-trips through validation (what subflows receive)
    again = Config.model_validate(cfg.to_dict())
    assert again == cfg


@pytest.mark.parametrize("override, fragment", [
    ("reconstruct.steps=0", "reconstruct.steps: Input should be greater than or equal to 1"),
    ("reconstruct.integrator=rk4", "unknown integrator 'rk4'; valid integrators: ddim, diffpir, dpmpp2s, "
                                   "euler, euler_maruyama, heun"),
    ("reconstruct.guidance=magic", "valid guidances: data_consistency, dps"),
    ("reconstruct.warm_start.t0=1.5", "reconstruct.warm_start.t0: Input should be less than 1"),
    ("reconstruct.warm_start.baseline=magic", "unknown baseline 'magic'"),
    ("reconstruct.guidance.params.tv=-1", "tv must be a finite number >= 0"),
    ("reconstruct.operators=[mri]", "unknown operator 'mri'; valid operators: acquired, blur, "
     "fourier, kykz_fourier, mask, slice_drop"),
    ("reconstruct.timer=exp", "valid timers: cosine, karras, linear"),
    ("compare.integrators=[euler, rk45]", "compare.integrators.1.name: unknown integrator 'rk45'"),
    ("reconstruct.operators=[{name: fourier, params: {accel: 4}}]",
     "unknown parameter(s) ['accel'] for operator 'fourier'; accepted: ['acceleration'"),
    ("reconstruct.operators=[{name: fourier, params: {acceleration: 0.5}}]",
     "acceleration must be a finite number >= 1"),
    ("reconstruct.operators=[{name: mask, params: {kind: star}}]", "unknown mask kind 'star'"),
    ("reconstruct.integrator={name: ddim, params: {eta: 3}}", "eta must lie in [0, 1]"),
    ("reconstruct.guidance={name: dps, params: {zeta: -1}}", "zeta must be a finite non-negative"),
    ("reconstruct.operators=[mask, mask]", "operators listed more than once"),
    ("reconstruct.device=gpu0", "device must be 'auto'"),
    ("recontruct.steps=3", "recontruct: unknown key"),
    ("reconstruct.stpes=3", "reconstruct.stpes: unknown key"),
    ("tracking.uri=file:///tmp/mlruns", "file: tracking stores are refused"),
    ("data.axis=3", "data.axis: Input should be 0, 1 or 2"),
    ("reconstruct.baselines=[cs]", "unknown baseline 'cs'; valid baselines: l1_wavelet, sense, tv"),
    ("reconstruct.baselines=[{name: tv, params: {lam: -1}}]", "lam must be a finite number >= 0"),
    ("reconstruct.baselines=[{name: tv, params: {iterations: 0}}]", "iterations must be an integer"),
    ("reconstruct.baselines=[{name: tv, params: {mu: 1}}]", "unknown parameter(s) ['mu'] for baseline"),
    ("reconstruct.baselines=[tv, tv]", "baselines listed more than once"),
    ("compare.methods=[{baseline: tv, steps: 4}]", "either a baseline or a diffusion setting"),
    ("compare.methods=[{guidance: dps, steps: 0}]", "compare.methods.0.steps"),
    ("compare.integrators=[]", "nothing to compare"),
])
def test_invalid_values_give_clear_errors(override, fragment):
    overrides = [override, "compare.methods=[]"] if override == "compare.integrators=[]" \
        else [override]
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert fragment in str(info.value)


def test_methods_short_forms_and_settings():
    cfg = load_config(None, ["compare.methods=[tv, {baseline: {name: l1_wavelet, params: {lam: 0.01}}}, "
                             "{guidance: dps, steps: 8}]", "compare.integrators=[euler]",
                             "compare.steps=[4]", "reconstruct.baselines=l1_wavelet"])
    rows = cfg.compare.rows()
    assert [(m.integrator.name if m.integrator else None, m.steps) for m in rows][0] == ("euler", 4)
    assert rows[1].baseline.name == "tv" and rows[2].baseline.lam == 0.01
    assert rows[2].baseline.label == "l1_wavelet(lam=0.01)"
    dps = rows[3].setting(cfg.reconstruct)
    assert dps.guidance.name == "dps" and dps.steps == 8 and dps.integrator == cfg.reconstruct.integrator
    assert all(o.guidance is None for o in dps.operators)  # one guidance for every operator
    assert rows[1].setting(cfg.reconstruct) == cfg.reconstruct
    assert [b.name for b in cfg.reconstruct.baselines] == ["l1_wavelet"]


def test_a_method_keeps_the_warm_start_unless_it_says_null():
    cfg = load_config("configs/demo.yaml")
    assert cfg.reconstruct.warm_start is not None
    keep = MethodConfig.model_validate({"guidance": "data_consistency", "steps": 29})
    assert keep.setting(cfg.reconstruct).warm_start == cfg.reconstruct.warm_start
    cold = MethodConfig.model_validate({"guidance": "data_consistency", "warm_start": None})
    assert cold.setting(cfg.reconstruct).warm_start is None
    assert "warm" not in cold.setting(cfg.reconstruct).label(cfg.reconstruct.operators[0])
    other = MethodConfig.model_validate({"warm_start": {"baseline": "tv", "t0": 0.5}})
    assert other.setting(cfg.reconstruct).warm_start.t0 == 0.5


def test_an_operator_may_start_from_noise_whatever_the_warm_start():
    """``warm_start: false`` on an operator: its sampler has no warm start (its label says so),
    the others keep reconstruct's; a comparison row that gives a warm start gives it to every
    operator; anything else on an operator is refused on load, naming the field."""
    import torch

    from recon.reconstruct.reconstruction import sampler_for

    cfg = load_config(ROOT / "configs" / "demo.yaml", ["reconstruct.operators.1.warm_start=false"],
                      base_dir=ROOT)
    rs = cfg.reconstruct
    mask, blur = rs.operators[:2]
    assert rs.warm_start_for(mask) == rs.warm_start is not None
    assert rs.warm_start_for(blur) is None
    assert "warm" in rs.label(mask) and "warm" not in rs.label(blur)
    for op, warm in ((mask, True), (blur, False)):
        sampler = sampler_for(op, rs, cfg.prior, None, torch.device("cpu"))(
            op.build((32, 32), rs.sigma_y))
        assert (sampler.warm_start is not None) == warm, op.name
    row = MethodConfig.model_validate({"warm_start": {"baseline": "tv", "t0": 0.5}}).setting(rs)
    assert row.warm_start_for(row.operators[1]).t0 == 0.5
    keep = MethodConfig.model_validate({"steps": 8}).setting(rs)
    assert keep.warm_start_for(keep.operators[1]) is None
    with pytest.raises(ConfigError, match=r"operators\.1\.warm_start.*can only be false"):
        load_config(ROOT / "configs" / "demo.yaml", ["reconstruct.operators.1.warm_start=true"],
                    base_dir=ROOT)


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["reconstruct.steps=-1", "reconstruct.n_samples=0", "data.bogus=1"])
    msg = str(info.value)
    assert "reconstruct.steps" in msg and "reconstruct.n_samples" in msg and "data.bogus" in msg


def test_bad_files_and_override_syntax(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("reconstruct: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(bad)
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        parse_override("reconstruct.steps")
    with pytest.raises(ConfigError, match="needs a list index"):
        load_config(None, ["reconstruct.operators.5.name=mask"])
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
    assert parse_override("a.b=") == (["a", "b"], "")


def test_compare_operator_is_checked_when_a_comparison_runs():
    """Changing the operators of a config whose compare section names another one still loads
    (``recon reconstruct kspace --set 'reconstruct.operators=[acquired]'``); the comparison
    itself is refused with the reason."""
    cfg = load_config(None, ["reconstruct.operators=[mask]", "compare.operator=fourier"])
    with pytest.raises(ConfigError, match="compare.operator: 'fourier' is not among"):
        _ = cfg.compare_operator
    assert load_config(None, ["reconstruct.operators=[mask]", "compare.operator=null"]
                       ).compare_operator.name == "mask"  # null: the first operator


def test_the_readme_kspace_example_loads_as_written():
    """``recon reconstruct kspace --set 'reconstruct.operators=[acquired]'`` (README): the
    compare section naming fourier no longer refuses it."""
    cfg = load_config(ROOT / "configs" / "kspace.yaml", ["reconstruct.operators=[acquired]"])
    assert [o.name for o in cfg.reconstruct.operators] == ["acquired"]


def test_default_yaml_spells_out_the_schema_defaults():
    """One source of defaults: ``configs/default.yaml`` is the schema's defaults, written out."""
    assert load_config("configs/default.yaml", base_dir=ROOT).to_dict() == \
        Config().absolute(ROOT).to_dict()


def test_the_readme_reference_table_gives_the_schema_defaults():
    """Every backticked default of the README's reference table equals the schema's (keys and
    defaults pair up in order: "`a`, `b` | `1`, `2`")."""
    import re

    import yaml

    defaults = flatten(Config().to_dict())
    text = (ROOT / "README.md").read_text()
    table = text[text.index("| key | default | meaning |"):]
    table = table[:table.index("\n\n")]
    checked = 0
    for row in table.splitlines()[2:]:
        keys_cell, default_cell = row.split(" | ")[:2]
        keys = re.findall(r"`([a-z_.]+)(?:\[\])?`", keys_cell)
        values = [v.strip() for v in default_cell.split(", ")]
        if len(keys) != len(values):
            continue
        for key, value in zip(keys, values, strict=True):
            if not (value.startswith("`") and value.endswith("`")) or key not in defaults \
                    or "<" in value:  # `<work_dir>/...`: a description, not a value
                continue
            given = yaml.safe_load(value.strip("`"))
            assert given == defaults[key], f"README says {key} = {given!r}, schema {defaults[key]!r}"
            checked += 1
    assert checked >= 20, checked


@pytest.mark.parametrize("name", ["default", "demo", "kspace"])
def test_shipped_configs_carry_every_lam_they_use(name):
    """A shipped config runs on a user's own data without validation volumes: every baseline
    and the warm start find their lam on each operator (``OperatorConfig.lam``)."""
    cfg = load_config(ROOT / "configs" / f"{name}.yaml", base_dir=ROOT)
    rs = cfg.reconstruct
    needed = [b.name for b in rs.baselines if b.lam is None]
    if rs.warm_start is not None and rs.warm_start.baseline.lam is None:
        needed.append(rs.warm_start.baseline.name)
    for op in rs.operators:
        missing = sorted(set(needed) - set(op.lam))
        assert not missing, f"{name}.yaml: operator {op.name} has no lam for {missing}"


def test_a_baseline_lam_may_name_the_discrepancy_rule_and_a_misspelt_rule_is_refused():
    """``lam: discrepancy`` (chosen per acquisition at solve time) loads for an operator's lam
    and for a baseline's own; numbers still load (YAML's ``1e-3`` is a string, read as a
    number); any other string is refused at load time, naming the field and the valid rule."""
    cfg = load_config(None, [
        "reconstruct.operators=[{name: fourier, lam: {sense: discrepancy, l1_wavelet: 1e-3}}]",
        "reconstruct.baselines=[{name: sense, params: {lam: discrepancy}}, l1_wavelet]"])
    assert cfg.reconstruct.operators[0].lam == {"sense": "discrepancy", "l1_wavelet": 1e-3}
    assert cfg.reconstruct.baselines[0].lam == "discrepancy"
    assert cfg.reconstruct.baselines[0].label == "sense(lam=discrepancy)"
    for override, where, bad in (
            ("reconstruct.operators=[{name: fourier, lam: {sense: discrepency}}]", "lam of sense",
             "'discrepency'"),
            ("reconstruct.baselines=[{name: tv, params: {lam: morozov}}]", "baselines.0: lam",
             "'morozov'")):
        with pytest.raises(ConfigError) as info:
            load_config(None, [override])
        message = str(info.value)
        assert where in message and "must be a finite number >= 0 or 'discrepancy'" in message
        assert f"got {bad}" in message
