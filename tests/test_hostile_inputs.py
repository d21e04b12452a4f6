"""Hostile or unlucky input: every case is refused quickly with one clear message (issue 15)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from recon import cli
from recon.config import ConfigError, load_config
from recon.data.manifest import ManifestError, load_manifest
from recon.prior_config import load_prior_config
from recon.yaml_io import MAX_BYTES, YamlError, parse_yaml, read_yaml

runner = CliRunner()


def alias_bomb(levels: int = 9) -> str:
    """The "billion laughs": each level lists the previous one 9 times (9^levels strings)."""
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    return "{" + ", ".join(lines) + "}"


def _quick(fn, *args, seconds: float = 1.0):
    start = time.perf_counter()
    with pytest.raises(ValueError) as info:
        fn(*args)
    assert time.perf_counter() - start < seconds
    return str(info.value)


def test_an_alias_bomb_in_an_override_is_refused_at_once():
    bomb = alias_bomb()
    assert len(bomb) < 700  # a few hundred characters that would expand to 387 M strings
    msg = _quick(load_config, None, [f"name={bomb}"])
    assert "more than the 100000 allowed" in msg and "aliases" in msg and "override name=" in msg
    assert bomb not in msg  # the message names the key, not the whole value


def test_an_alias_bomb_in_a_config_or_manifest_file_is_refused(tmp_path):
    bad = tmp_path / "bomb.yaml"
    bad.write_text("name: x\n" + "\n".join(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]"
                                           if i else "a0: &a0 [lol, lol]" for i in range(9)))
    assert "aliases" in _quick(load_config, bad)
    with pytest.raises(ManifestError, match="aliases"):
        load_manifest(bad)
    with pytest.raises(YamlError, match="aliases"):
        load_prior_config(bad)
    # anchors, aliases and merge keys of a sane size still read (the public manifest uses them)
    assert parse_yaml("a: &x {k: 1}\nb: {<<: *x, j: 2}") == {"a": {"k": 1}, "b": {"k": 1, "j": 2}}


@pytest.mark.parametrize("content, fragment", [
    (os.urandom(4096), "not UTF-8 text"),
    (b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, "not UTF-8 text"),
    (b"name: demo\x00\x00\x00", "contains NUL bytes"),
    (b"name: [unclosed", "not valid YAML"),
    (b"name: !!python/object/apply:os.system ['echo owned']", "not valid YAML"),
])
def test_config_files_that_are_not_utf8_yaml_are_refused_in_under_a_second(tmp_path, content,
                                                                              fragment):
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    assert fragment in _quick(load_config, path)


def test_oversized_yaml_is_refused_before_it_is_read(tmp_path):
    big = tmp_path / "big.yaml"
    with open(big, "wb") as fh:
        fh.truncate(MAX_BYTES + 1)  # sparse: nothing is written, only its size
    msg = _quick(read_yaml, big)
    assert f"more than the {MAX_BYTES} allowed" in msg
    assert "more than" in _quick(load_config, None, ["name=" + "x" * (MAX_BYTES + 1)], seconds=2)


def test_the_cli_says_one_line_and_exits_2_for_a_binary_config(tmp_path):
    path = tmp_path / "binary.yaml"
    path.write_bytes(os.urandom(2048))
    out = runner.invoke(cli.app, ["config", str(path)])
    assert out.exit_code == 2
    assert "invalid configuration" in out.output and "not UTF-8 text" in out.output
    assert "Traceback" not in out.output
    out = runner.invoke(cli.app, ["config", "demo", "--set", f"name={alias_bomb()}"])
    assert out.exit_code == 2 and "aliases" in out.output and "Traceback" not in out.output


def test_real_configs_and_manifests_still_read():
    root = Path(__file__).resolve().parents[1]
    for name in ("demo", "default", "prior_native", "prior_64"):
        assert isinstance(read_yaml(root / "configs" / f"{name}.yaml"), dict)
    assert load_manifest(root / "data_manifests" / "public_brain.yaml").volumes("test")
    assert yaml.safe_load((root / "configs" / "demo.yaml").read_text()) == \
        read_yaml(root / "configs" / "demo.yaml")
    with pytest.raises(ConfigError, match="undefined alias"):
        load_config(None, ["reconstruct.steps=[1, *x]"])


def test_one_file_under_two_paths_in_train_and_test_is_a_leak(tmp_path):
    """The same bytes listed twice (two paths, two subjects, one in train, one in test) pass
    every per-entry check; the sha256 catches it."""
    sha = "ab" * 32
    entry = {"sha256": sha, "modality": "T1w"}
    manifest = {"name": "leaky", "volumes": [
        {**entry, "id": "a", "path": "a.nii.gz", "subject": "s1", "split": "train"},
        {**entry, "id": "b", "path": "copy/b.nii.gz", "subject": "s2", "split": "test"}]}
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(manifest))
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    msg = str(info.value)
    assert "the same file (sha256 abababababab...) is listed more than once" in msg
    assert "'a' (train: a.nii.gz), 'b' (test: copy/b.nii.gz) - a leak between splits" in msg


@pytest.mark.parametrize("affine, fragment", [
    (np.zeros((4, 4)), "singular"),
    (np.diag([1.0, 1.0, 0.0, 1.0]), "singular"),
    (np.array([[1.0, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]), "singular"),
    (np.where(np.eye(4) > 0, np.nan, 0.0), "NaN/Inf"),
])
def test_a_nifti_without_usable_geometry_is_refused(tmp_path, affine, fragment):
    """A singular, all-zero or NaN affine would be copied into every output, which then overlays
    nothing; the volume is refused by the manifest check and by the loader, naming why."""
    import hashlib

    import nibabel as nib

    from recon.data.loading import load_volume
    from recon.data.manifest import DataError, verify
    from recon.data.nifti import affine_problem

    assert affine_problem(np.diag([2.0, 2.0, 3.0, 1.0])) is None
    assert "last row" in affine_problem(np.ones((4, 4)))
    data = np.zeros((12, 10, 6), np.float32)
    data[3:9, 2:8, 1:5] = 100.0
    hdr = nib.Nifti1Header()  # written field by field: nibabel will not build such an image
    hdr.set_data_shape(data.shape)
    hdr.set_data_dtype(np.float32)
    hdr["srow_x"], hdr["srow_y"], hdr["srow_z"] = affine[0], affine[1], affine[2]
    hdr["sform_code"], hdr["qform_code"] = 1, 0
    path = tmp_path / "broken.nii.gz"
    nib.save(nib.Nifti1Image(data, None, header=hdr), path)
    assert affine_problem(nib.load(path).affine) is not None
    manifest = tmp_path / "m.yaml"
    manifest.write_text(yaml.safe_dump({"name": "x", "volumes": [{
        "id": "broken", "path": "broken.nii.gz", "subject": "s", "split": "test",
        "modality": "T1w", "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}]}))
    with pytest.raises(DataError, match=f"'broken'.*{fragment}"):
        verify(load_manifest(manifest), tmp_path)
    with pytest.raises(DataError, match=fragment):
        load_volume(path, size=None)


@pytest.mark.parametrize("override, fragment", [
    ("reconstruct.operators=[{name: fourier, params: {coils: 100000}}]",
     "coils must be an integer in [1, 64]"),
    ("reconstruct.guidance={name: tweedie_covariance, params: {cg_steps: 1000000000}}",
     "cg_steps must be an integer in [1, 100]"),
    ("reconstruct.batch_size=1000000000000",
     "reconstruct.batch_size: Input should be less than or equal to 1024"),
    ("reconstruct.steps=true", "reconstruct.steps: Input should be a valid integer"),
    ("reconstruct.n_samples=2.5", "reconstruct.n_samples: Input should be a valid integer"),
    (f"reconstruct.seed={2**70}", "reconstruct.seed: Input should be less than or equal to"),
])
def test_numbers_out_of_bounds_are_refused_on_load_in_under_a_second(override, fragment):
    """Values that would allocate gigabytes, run for ever or be silently coerced (true -> 1) are
    refused by the config schema, naming the field, before anything is built."""
    assert fragment in _quick(load_config, None, [override])
