"""Data layer: manifests, NIfTI I/O, materialisation of the public set, MONAI slice loading.

Everything runs on tiny synthetic NIfTI files in tmp_path (no network); the shipped manifest
is checked for well-formedness only.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import time
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from recon.data import archives, conversion, public, sources
from recon.data import nifti as nifti_mod
from recon.data.manifest import DataError, ManifestError, Source, load_manifest, resolve
from recon.data.nifti import read_nifti, write_nifti
from recon.data.verify import sha256_file, verify, verify_volume

REPO = Path(__file__).resolve().parents[1]


# -- helpers -----------------------------------------------------------------------------------
def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def brain(shape=(20, 24, 12), seed=0) -> np.ndarray:
    """An ellipsoid 'head' with texture, empty first/last slices along every axis."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1.3, 1.3, n) for n in shape], indexing="ij")
    r = sum(g ** 2 for g in grids)
    img = (r < 1.0) * (100 + 40 * np.sin(3 * grids[0]) + 5 * rng.standard_normal(shape))
    return np.clip(img, 0, None).astype(np.float32)


def save(path: Path, data: np.ndarray, affine=None, gz=True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(data, np.diag([2.0, 2.0, 3.0, 1.0]) if affine is None else affine)
    nib.save(img, path)
    return path


def entry(vid, path, digest, subject=None, split="train", **kw) -> dict:
    return {"id": vid, "path": path, "sha256": digest, "subject": subject or vid,
            "split": split, "modality": "T1w", **kw}


def write_manifest(tmp: Path, volumes: list[dict], **top) -> Path:
    p = tmp / "manifest.yaml"
    p.write_text(yaml.safe_dump({"name": "t", "volumes": volumes, **top}, sort_keys=False))
    return p


@pytest.fixture
def root(tmp_path) -> Path:
    r = tmp_path / "root"
    r.mkdir()
    return r


# -- manifest validation ------------------------------------------------------------------------
def test_manifest_loads_and_filters(tmp_path):
    vols = [entry("a", "a.nii.gz", "0" * 64, split="train"),
            entry("b", "b.nii.gz", "1" * 64, split="test"),
            entry("c", "sub/c.nii", "A" * 64, split="test", optional=True)]
    m = load_manifest(write_manifest(tmp_path, vols))
    assert [v.id for v in m.volumes()] == ["a", "b", "c"]
    assert [v.id for v in m.volumes("test")] == ["b", "c"]
    assert [v.id for v in m.volumes("test", include_optional=False)] == ["b"]
    assert m.volume("c").sha256 == "a" * 64  # normalised to lower case
    assert m.subjects("test") == ["b", "c"]
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        m.volumes("dev")
    with pytest.raises(KeyError, match="no volume 'zz'"):
        m.volume("zz")


@pytest.mark.parametrize(("change", "match"), [
    ({"path": "../../etc/passwd"}, r"must not contain '\.\.'"),
    ({"path": "/etc/passwd"}, "not absolute"),
    ({"path": "C:/x.nii"}, "not absolute"),
    ({"sha256": "abc"}, "64 hexadecimal digits"),
    ({"sha256": 1234}, r"must be a \(quoted\) string"),
    ({"split": "dev"}, r"volumes\[0\] \(id 'a'\)\.split"),
    ({"id": "bad id!"}, "must match"),
    ({"sha265": "0" * 64}, "Extra inputs are not permitted"),
    ({"orientation": "XYZ"}, "orientation"),
])
def test_manifest_rejects_bad_entries(tmp_path, change, match):
    vol = entry("a", "a.nii.gz", "0" * 64) | change
    with pytest.raises(ManifestError, match=match):
        load_manifest(write_manifest(tmp_path, [vol]))


def test_manifest_rejects_duplicates_subject_leak_and_templates(tmp_path):
    with pytest.raises(ManifestError, match="duplicate id 'a'"):
        load_manifest(write_manifest(tmp_path, [entry("a", "a.nii", "0" * 64),
                                                entry("a", "b.nii", "0" * 64)]))
    with pytest.raises(ManifestError, match="duplicate path 'x/a.nii'"):
        load_manifest(write_manifest(tmp_path, [entry("a", "x/a.nii", "0" * 64),
                                                entry("b", "x//a.nii", "0" * 64)]))
    with pytest.raises(ManifestError, match=r"subject 'p1' appears in more than one split "
                                             r"\(test: b; train: a\)"):
        load_manifest(write_manifest(tmp_path, [entry("a", "a.nii", "0" * 64, "p1", "train"),
                                                entry("b", "b.nii", "0" * 64, "p1", "test")]))
    with pytest.raises(ManifestError, match="template can only be in the train split"):
        load_manifest(write_manifest(tmp_path, [entry("a", "a.nii", "0" * 64, split="val",
                                                      kind="template")]))
    with pytest.raises(ManifestError, match="unknown source 'nope'"):
        load_manifest(write_manifest(tmp_path, [entry("a", "a.nii", "0" * 64,
                                                      provenance={"source": "nope"})]))


def test_manifest_file_errors(tmp_path):
    with pytest.raises(ManifestError, match="cannot read manifest"):
        load_manifest(tmp_path / "absent.yaml")
    (tmp_path / "bad.yaml").write_text("volumes: [a, b\n")
    with pytest.raises(ManifestError, match="not valid YAML"):
        load_manifest(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ManifestError, match="expected a mapping"):
        load_manifest(tmp_path / "list.yaml")
    assert issubclass(ManifestError, DataError) and issubclass(DataError, ValueError)


def test_resolve_refuses_escapes(tmp_path, root):
    m = load_manifest(write_manifest(tmp_path, [entry("in", "d/in.nii", "0" * 64),
                                                entry("out", "link.nii", "1" * 64),
                                                entry("dir", "ldir/x.nii", "2" * 64)]))
    assert resolve(m.volume("in"), root) == (root / "d/in.nii").resolve()
    outside = tmp_path / "secret.nii"
    outside.write_bytes(b"x")
    (root / "link.nii").symlink_to(outside)
    with pytest.raises(DataError, match="'out'.*outside the data root"):
        resolve(m.volume("out"), root)
    (root / "ldir").symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(DataError, match="'dir'.*outside the data root"):
        resolve(m.volume("dir"), root)
    (root / "d").mkdir()
    (root / "d" / "real.nii").write_bytes(b"x")
    (root / "d" / "in.nii").symlink_to(root / "d" / "real.nii")  # a link inside is fine
    assert resolve(m.volume("in"), root).name == "real.nii"
    # a model built in code bypassing validation is still refused by resolve
    bad = m.volume("in").model_copy(update={"path": "../../etc/passwd"})
    with pytest.raises(DataError, match=r"'in'.*'\.\.'"):
        resolve(bad, root)


# -- verify -------------------------------------------------------------------------------------
def test_verify_ok_and_every_bad_case(tmp_path, root):
    good = save(root / "good.nii.gz", brain())
    one = save(root / "t1.nii.gz", brain()[..., None])                  # 4-D, 4th dim 1: ok
    four = save(root / "four.nii.gz", np.stack([brain()] * 3, -1))      # 4-D, 3 frames
    nan = brain()
    nan[3, 3, 3] = np.nan
    nan[4, 4, 4] = np.inf
    nanp = save(root / "nan.nii.gz", nan)
    corrupt = root / "corrupt.nii.gz"
    corrupt.write_bytes(good.read_bytes()[:300])                         # truncated gzip
    garbage = root / "garbage.nii"
    garbage.write_bytes(b"not a nifti file at all" * 20)
    vols = [entry("good", "good.nii.gz", sha256_file(good), shape=[20, 24, 12],
                  spacing=[2, 2, 3], orientation="RAS"),
            entry("t1", "t1.nii.gz", sha256_file(one)),
            entry("opt", "absent.nii.gz", "0" * 64, optional=True)]
    m = load_manifest(write_manifest(tmp_path, vols))
    checks = verify(m, root)
    assert [c.status for c in checks] == ["ok", "ok", "missing (optional)"]
    assert checks[0].shape == (20, 24, 12) and checks[0].orientation == "RAS"
    assert checks[1].shape == (20, 24, 12, 1)

    cases = [
        (entry("miss", "absent.nii.gz", "0" * 64), "'miss': missing file"),
        (entry("sum", "good.nii.gz", "1" * 64), "'sum': checksum mismatch"),
        (entry("cor", "corrupt.nii.gz", sha256_file(corrupt)), "'cor': unreadable NIfTI"),
        (entry("gar", "garbage.nii", sha256_file(garbage)), "'gar': unreadable NIfTI"),
        (entry("four", "four.nii.gz", sha256_file(four)),
         r"'four': expected a 3-D volume .* got shape \(20, 24, 12, 3\)"),
        (entry("nan", "nan.nii.gz", sha256_file(nanp)), r"'nan': 2 non-finite \(NaN/Inf\)"),
        (entry("shp", "good.nii.gz", sha256_file(good), shape=[1, 2, 3]), "'shp': shape"),
        (entry("spc", "good.nii.gz", sha256_file(good), spacing=[1, 1, 1]), "'spc': spacing"),
        (entry("ori", "good.nii.gz", sha256_file(good), orientation="LPS"),
         "'ori': orientation RAS differs"),
    ]
    for vol, match in cases:
        m1 = load_manifest(write_manifest(tmp_path, [vol]))
        with pytest.raises(DataError, match=match):
            verify(m1, root)
    # several problems: one error listing all of them
    m2 = load_manifest(write_manifest(tmp_path, [c[0] | {"path": f"{i}/" + c[0]["path"]}
                                                 for i, c in enumerate(cases[:2])]))
    with pytest.raises(DataError, match=r"2 problem\(s\)(.|\n)*'miss'(.|\n)*'sum'"):
        verify(m2, root)
    assert verify_volume(m.volume("good"), root, read=False).status == "ok"


# -- NIfTI I/O ----------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_write_read_keeps_geometry(tmp_path, suffix):
    aff = np.array([[0, 0, -1.5, 90], [-0.9, 0, 0, 120], [0, 1.1, 0, -70], [0, 0, 0, 1.0]])
    src = nib.Nifti1Image((brain() * 3).astype(np.int16), aff)
    src.set_qform(aff, code=1)
    src.set_sform(aff, code=4)
    src.header.set_xyzt_units("mm", "sec")
    src.header.set_slope_inter(0.5, 10.0)
    ref = tmp_path / f"ref{suffix}"
    nib.save(src, ref)
    data, affine, header = read_nifti(ref)
    assert data.dtype == np.float32
    np.testing.assert_allclose(data, (brain() * 3).astype(np.int16) * 0.5 + 10, rtol=1e-6)
    out = write_nifti(data * 2, tmp_path / f"out{suffix}", like=ref)
    back, aff2, hdr2 = read_nifti(out)
    assert back.shape == data.shape
    np.testing.assert_array_equal(back, data * 2)
    np.testing.assert_array_equal(aff2, affine)
    assert hdr2.get_zooms() == header.get_zooms()
    assert int(hdr2["sform_code"]) == 4 and int(hdr2["qform_code"]) == 1
    assert hdr2.get_xyzt_units() == ("mm", "sec")
    assert hdr2.get_data_dtype() == np.float32
    with pytest.raises(ValueError, match="would not overlay"):
        write_nifti(data[:-1], tmp_path / f"bad{suffix}", like=ref)
    with pytest.raises(ValueError, match=".nii or .nii.gz"):
        write_nifti(data, tmp_path / "x.img", like=ref)


def test_write_3d_into_4d_like_and_plain_affine(tmp_path):
    ref = save(tmp_path / "ref.nii.gz", brain()[..., None])
    out = write_nifti(brain(), tmp_path / "o.nii.gz", like=ref)
    assert nib.load(out).shape == (20, 24, 12, 1)
    out2 = write_nifti(brain(), tmp_path / "p.nii", affine=np.diag([3.0, 2.0, 1.0, 1.0]))
    assert nib.load(out2).header.get_zooms() == (3.0, 2.0, 1.0)


def test_write_nifti_is_atomic(tmp_path, monkeypatch):
    target = tmp_path / "o.nii.gz"
    target.write_bytes(b"previous")

    def failing_save(img, filename):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(nifti_mod.nib, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        write_nifti(brain(), target)
    assert target.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.nii.gz"]  # no temp file left


# -- materialise --------------------------------------------------------------------------------
def jpeg_bytes(h=24, w=16) -> bytes:
    from PIL import Image

    img = np.zeros((h, w), np.uint8)
    img[2:8, 3:12] = 200  # a bright block near the top (anterior)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


@pytest.fixture
def fake_public(tmp_path):
    """A manifest with a 'pypi' source served from a wheel-like zip in a local cache, plus an
    optional Debian source that is not available."""
    vol = io.BytesIO()
    nib_img = nib.Nifti1Image(brain().astype(np.int16), np.diag([2.0, 2.0, 3.0, 1.0]))
    raw = gzip.compress(nib_img.to_bytes(), mtime=0)
    vol.write(raw)
    jpg = jpeg_bytes()
    cache = tmp_path / "cache"
    cache.mkdir()
    whl = cache / "fakepkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as zf:
        zf.writestr("fakepkg/data/vol.nii.gz", raw)
        zf.writestr("fakepkg/data/slice.jpg", jpg)
    converted = conversion.jpg_to_nifti_bytes(jpg, "recon: fakepkg-1.0 fakepkg/data/slice.jpg")
    sources = {"fake": {"kind": "pypi", "package": "fakepkg", "version": "1.0",
                        "filename": whl.name, "sha256": sha256_file(whl)},
               "deb": {"kind": "debian", "package": "recon-no-such-package-xyz",
                       "version": "1.0", "filename": "recon-no-such-package-xyz_1.0_all.deb",
                       "optional": True}}
    prov = {"source": "fake", "package": "fakepkg", "version": "1.0"}
    vols = [entry("vol", "fake/vol.nii.gz", sha(raw), "s1", "train",
                  provenance=prov | {"member": "fakepkg/data/vol.nii.gz"}),
            entry("jpg", "fake/slice.nii", sha(converted), "s2", "test",
                  shape=[16, 24, 1], orientation="RAS",
                  provenance=prov | {"member": "fakepkg/data/slice.jpg", "convert": "jpg_to_nifti",
                                     "member_sha256": sha(jpg)}),
            entry("deb", "debian/x.nii.gz", "0" * 64, "s3", "test", optional=True,
                  provenance={"source": "deb", "member": "usr/share/x.nii.gz"}),
            entry("optbad", "fake/optbad.nii.gz", "e" * 64, "s4", "test", optional=True,
                  provenance=prov | {"member": "fakepkg/data/vol.nii.gz"})]
    manifest = write_manifest(tmp_path, vols, sources=sources)
    return manifest, cache


def test_materialise_extracts_checks_and_is_idempotent(tmp_path, fake_public):
    manifest, cache = fake_public
    root = tmp_path / "data"
    lines: list[str] = []
    rep = public.materialise(manifest, root, cache_dir=cache, download=False, echo=lines.append)
    by_id = {v.id: v for v in rep.volumes}
    assert rep.ok, rep.table()
    assert by_id["vol"].status == "written" and by_id["vol"].shape == (20, 24, 12)
    assert by_id["jpg"].status == "written" and by_id["jpg"].shape == (16, 24, 1)
    assert by_id["deb"].status == "skipped"
    assert by_id["optbad"].status == "skipped" and "manifest pins eeee" in by_id["optbad"].message
    assert not (root / "fake/optbad.nii.gz").exists()
    assert any("optional" in m and "recon-no-such-package-xyz" in m for m in rep.messages)
    assert "skipped" in rep.table() and "2 volumes ready" in rep.table()
    verify(load_manifest(manifest), root)  # checksums of what was written
    # the JPEG's top rows (anterior) end up at +y, columns along +x
    data, affine, _ = read_nifti(root / "fake/slice.nii")
    np.testing.assert_array_equal(affine, np.eye(4))
    assert data[3:12, 24 - 8:24 - 2, 0].mean() > 150 and data[:, :10, 0].mean() < 20
    # second run: nothing rewritten, fast
    mtime = (root / "fake/vol.nii.gz").stat().st_mtime_ns
    t0 = time.perf_counter()
    rep2 = public.materialise(manifest, root, cache_dir=cache, download=False, echo=None)
    assert time.perf_counter() - t0 < 2.0
    assert [v.status for v in rep2.volumes] == ["present", "present", "skipped", "skipped"]
    assert (root / "fake/vol.nii.gz").stat().st_mtime_ns == mtime
    # a damaged file is replaced
    (root / "fake/vol.nii.gz").write_bytes(b"damaged")
    rep3 = public.materialise(manifest, root, cache_dir=cache, download=False, echo=None)
    assert rep3.volumes[0].status == "written"
    assert not [p for p in root.rglob("*") if ".tmp" in p.name]


def test_materialise_checksum_mismatch_and_failed_write_leave_nothing(tmp_path, fake_public,
                                                                     monkeypatch):
    manifest, cache = fake_public
    text = manifest.read_text()
    m = load_manifest(manifest)
    bad = text.replace(m.volume("vol").sha256, "f" * 64)
    manifest.write_text(bad)
    root = tmp_path / "data"
    rep = public.materialise(manifest, root, cache_dir=cache, download=False, echo=None)
    st = {v.id: v for v in rep.volumes}
    assert not rep.ok and st["vol"].status == "error"
    assert "manifest pins ffff" in st["vol"].message
    assert not (root / "fake/vol.nii.gz").exists()
    assert st["jpg"].status == "written"  # the rest goes on
    manifest.write_text(text)

    real_replace = os.replace

    def crash(src, dst):  # the disk fills up after the bytes were written
        raise OSError("No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    rep = public.materialise(manifest, root, cache_dir=cache, download=False, echo=None)
    monkeypatch.setattr(os, "replace", real_replace)
    assert {v.id: v.status for v in rep.volumes}["vol"] == "error"
    assert "No space left" in rep.volumes[0].message
    assert not (root / "fake/vol.nii.gz").exists()
    assert sorted(p.name for p in (root / "fake").iterdir()) == ["slice.nii"]  # no temp files


def test_materialise_without_cache_and_download_off_reports_source(tmp_path, fake_public):
    manifest, _ = fake_public
    rep = public.materialise(manifest, tmp_path / "data", cache_dir=tmp_path / "empty",
                             download=False, echo=None)
    st = {v.id: v for v in rep.volumes}
    assert st["vol"].status == "error" and "downloading is off" in st["vol"].message
    assert st["deb"].status == "skipped"
    assert "FAILED" in rep.table()


def test_materialising_kspace_on_an_empty_root_makes_its_brain_volumes_without_hanging(
        tmp_path, fake_public):
    """A simulated k-space entry derives from a brain volume of the default manifest: on an empty
    data root, materialise makes that set first, inside the lock it already holds on the root
    (it used to take the lock a second time and wait on itself forever). A subprocess under a
    timeout, as `recon materialise --manifest data_manifests/public_kspace.yaml` runs."""
    import subprocess
    import sys

    brain_manifest, cache = fake_public
    member = load_manifest(brain_manifest).volume("vol")
    params = {"fmt": "ismrmrd", "coils": 2, "slices": 1, "noise": 0.01, "oversampling": 2,
              "seed": 3}
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (scratch / "v.nii.gz").write_bytes(archives.read_member(cache / "fakepkg-1.0-py3-none-any.whl",
                                                            member.provenance.member))
    digest = sha(conversion.simulated_kspace_bytes(scratch / "v.nii.gz", **params))
    kspace_dir = tmp_path / "k"
    kspace_dir.mkdir()
    kspace_manifest = write_manifest(kspace_dir, [entry(
        "vol_kspace", "kspace/vol.h5", digest, "s1", "test", kind="kspace",
        provenance={"convert": "simulate_kspace", "member": member.path, "params": params})])
    code = ("import sys\nfrom recon.data import public\n"
            "public.DEFAULT_MANIFEST = sys.argv[3]\n"
            "rep = public.materialise(sys.argv[1], sys.argv[2], cache_dir=sys.argv[4], "
            "download=False, echo=print)\nprint('OK' if rep.ok else rep.table())")
    root = tmp_path / "empty"
    done = subprocess.run([sys.executable, "-c", code, str(kspace_manifest), str(root),
                           str(brain_manifest), str(cache)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and done.stdout.strip().endswith("OK"), done.stdout + done.stderr
    assert "making the public brain volumes" in done.stdout
    verify(load_manifest(kspace_manifest), root)
    assert (root / member.path).is_file()


def test_read_member_tar_and_deb(tmp_path):
    import tarfile

    payload = b"hello brain"
    tar_bytes = io.BytesIO()
    with tarfile.open(fileobj=tar_bytes, mode="w:xz") as tf:
        info = tarfile.TarInfo("./usr/share/x.nii.gz")
        info.size = len(payload)
        tf.addfile(info, io.BytesIO(payload))
    sdist = tmp_path / "p-1.0.tar.xz"
    sdist.write_bytes(tar_bytes.getvalue())
    assert archives.read_member(sdist, "usr/share/x.nii.gz") == payload
    body = tar_bytes.getvalue()

    def ar_member(name: str, data: bytes) -> bytes:
        head = f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode()
        return head + data + (b"\n" if len(data) % 2 else b"")

    deb = tmp_path / "p_1.0_all.deb"
    deb.write_bytes(b"!<arch>\n" + ar_member("debian-binary", b"2.0\n")
                    + ar_member("control.tar.xz", b"x") + ar_member("data.tar.xz", body))
    assert archives.read_member(deb, "usr/share/x.nii.gz") == payload
    with pytest.raises(DataError, match="no member"):
        archives.read_member(deb, "usr/share/y.nii.gz")


def test_jpg_conversion_is_deterministic():
    jpg = jpeg_bytes()
    a = conversion.jpg_to_nifti_bytes(jpg, "d")
    assert a == conversion.jpg_to_nifti_bytes(jpg, "d")
    img = nib.Nifti1Image.from_bytes(a)
    assert img.shape == (16, 24, 1) and img.get_data_dtype() == np.uint8
    assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1


def test_nrrd_conversion_keeps_values_and_world_geometry(tmp_path):
    """An LPS NRRD (pynrrd) becomes a NIfTI whose voxels are the same and whose affine maps
    every voxel to the same point in the world (RAS = LPS with x and y negated)."""
    import nrrd

    data = np.arange(4 * 5 * 3, dtype=np.int16).reshape(4, 5, 3)
    directions = np.array([[0.8, 0.0, 0.0], [0.0, 0.0, -0.9], [0.0, 6.5, 0.0]])
    origin = np.array([-100.0, 20.0, -40.0])
    nrrd.write(str(tmp_path / "a.nrrd"), data, {"space": "left-posterior-superior",
                                                "space directions": directions,
                                                "space origin": origin})
    raw = (tmp_path / "a.nrrd").read_bytes()
    out = conversion.nrrd_to_nifti_bytes(raw, "d")
    assert out == conversion.nrrd_to_nifti_bytes(raw, "d")  # deterministic bytes
    img = nib.Nifti1Image.from_bytes(out)
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), data)
    voxel = np.array([3, 1, 2])
    lps = origin + voxel @ directions
    np.testing.assert_allclose(img.affine[:3, :3] @ voxel + img.affine[:3, 3],
                               lps * [-1, -1, 1], atol=1e-9)
    with pytest.raises(DataError, match="not a readable NRRD"):
        conversion.nrrd_to_nifti_bytes(b"NRRD0004\ngarbage", "d")


def _dicom_slice(pixels, position, slope=2.0):
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = MRImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.Rows, ds.Columns = "MR", *pixels.shape
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0.8, -0.6]  # oblique: rows along y/z
    ds.ImagePositionPatient = list(position)
    ds.PixelSpacing = [0.9, 0.7]  # between rows, between columns
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept = slope, -5
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_dicom_series_conversion_orders_slices_and_places_voxels():
    """A series given out of order: slices sorted along the normal, rescale applied, and voxel
    (column, row, slice) placed at IPP + column * PixelSpacing[1] * row_dir + row *
    PixelSpacing[0] * col_dir + slice * step, in RAS."""
    normal = np.cross([1, 0, 0], [0, 0.8, -0.6])
    first = np.array([-50.0, 10.0, 30.0])
    frames = [np.full((6, 4), 10 * k, dtype=np.uint16) + np.arange(4) for k in range(3)]
    files = [_dicom_slice(frames[k], first + 4.0 * k * normal) for k in (2, 0, 1)]
    out = conversion.dicom_series_to_nifti_bytes(files, "d")
    img = nib.Nifti1Image.from_bytes(out)
    data = np.asanyarray(img.dataobj)
    assert data.shape == (4, 6, 3) and data.dtype == np.int16
    np.testing.assert_array_equal(data[..., 1], (2 * frames[1] - 5).T)  # slope 2, intercept -5
    col, row, k = 3, 5, 2
    lps = first + col * 0.7 * np.array([1, 0, 0]) + row * 0.9 * np.array([0, 0.8, -0.6]) \
        + k * 4.0 * normal
    np.testing.assert_allclose(img.affine[:3, :3] @ [col, row, k] + img.affine[:3, 3],
                               lps * [-1, -1, 1], atol=1e-6)
    with pytest.raises(DataError, match="at least 2 slices"):
        conversion.dicom_series_to_nifti_bytes(files[:1])
    with pytest.raises(DataError, match="not a readable DICOM"):
        conversion.dicom_series_to_nifti_bytes([files[0], b"not dicom"])


def test_archives_come_straight_from_the_package_indexes(tmp_path, monkeypatch):
    """PyPI: the archive named in the manifest is read off the project's simple-index page
    (PEP 503) and checked against its sha256 (nothing is built, unlike ``pip download`` of an
    sdist); npm: the registry's tarball. A wrong checksum leaves no file behind."""
    import http.server
    import threading

    site = tmp_path / "site"
    (site / "simple" / "some-pkg").mkdir(parents=True)
    (site / "files").mkdir()
    (site / "npm" / "somepkg" / "-").mkdir(parents=True)
    payload = b"an sdist"
    (site / "files" / "some_pkg-1.0.tar.gz").write_bytes(payload)
    (site / "npm" / "somepkg" / "-" / "somepkg-2.0.tgz").write_bytes(payload)
    digest = hashlib.sha256(payload).hexdigest()
    (site / "simple" / "some-pkg" / "index.html").write_text(
        f'<a href="../../files/some_pkg-1.0.tar.gz#sha256={digest}">some_pkg-1.0.tar.gz</a>')

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **k):
            super().__init__(*a, directory=str(site), **k)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("PIP_INDEX_URL", f"{base}/simple")
    monkeypatch.setenv("NPM_CONFIG_REGISTRY", f"{base}/npm")
    try:
        pypi = Source(kind="pypi", package="Some.Pkg", version="1.0", dist="sdist",
                      filename="some_pkg-1.0.tar.gz", sha256=digest)
        got = sources.fetch_source("p", pypi, tmp_path / "cache", echo=lambda _: None)
        assert got.read_bytes() == payload
        npm = Source(kind="npm", package="somepkg", version="2.0", dist="tgz",
                     filename="somepkg-2.0.tgz", sha256=digest)
        assert sources.fetch_source("n", npm, tmp_path / "npm", echo=lambda _: None).is_file()
        bad = pypi.model_copy(update={"sha256": "0" * 64})
        with pytest.raises(DataError, match="the manifest pins 0000"):
            sources.fetch_source("p", bad, tmp_path / "bad", echo=lambda _: None)
        assert not any((tmp_path / "bad").iterdir())
    finally:
        server.shutdown()



def test_two_runs_materialising_one_data_root_at_once_both_succeed(tmp_path):
    """Two flows on one machine share a data root: both materialise it at once, downloading
    the same archive from a slow index. They take turns (a lock on the data root; a download's
    temporary file is its process's own), so neither reads a half-written archive, both
    report ok, and every file checks out."""
    import http.server
    import subprocess
    import sys
    import threading

    raw = gzip.compress(nib.Nifti1Image(brain().astype(np.int16), np.eye(4)).to_bytes(), mtime=0)
    site = tmp_path / "site"
    (site / "simple" / "fakepkg").mkdir(parents=True)
    whl = site / "fakepkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as zf:
        zf.writestr("fakepkg/data/vol.nii.gz", raw)
        zf.writestr("fakepkg/data/pad.bin", np.random.default_rng(0).bytes(1 << 20))
    (site / "simple" / "fakepkg" / "index.html").write_text(f'<a href="../../{whl.name}">w</a>')

    class Slow(http.server.SimpleHTTPRequestHandler):  # ~1 s per download: they overlap
        def __init__(self, *a, **k):
            super().__init__(*a, directory=str(site), **k)

        def copyfile(self, source, outputfile):
            while chunk := source.read(64 << 10):
                outputfile.write(chunk)
                time.sleep(0.05)

        def log_message(self, *args):
            pass

    manifest = write_manifest(tmp_path, [entry("vol", "fake/vol.nii.gz", sha(raw), provenance={
        "source": "fake", "package": "fakepkg", "version": "1.0",
        "member": "fakepkg/data/vol.nii.gz"})], sources={"fake": {
            "kind": "pypi", "package": "fakepkg", "version": "1.0", "filename": whl.name,
            "sha256": sha256_file(whl)}})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {**os.environ, "PIP_INDEX_URL": f"http://127.0.0.1:{server.server_address[1]}/simple"}
    code = ("import sys\nfrom recon.data.public import materialise\n"
            "rep = materialise(sys.argv[1], sys.argv[2], echo=None)\n"
            "print('OK' if rep.ok else rep.table())")
    root = tmp_path / "data"
    try:
        runs = [subprocess.Popen([sys.executable, "-c", code, str(manifest), str(root)], env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                for _ in range(2)]
        outs = [p.communicate(timeout=120)[0] for p in runs]
    finally:
        server.shutdown()
    assert all(p.returncode == 0 and out.strip().endswith("OK") for p, out in
               zip(runs, outs, strict=True)), outs
    verify(load_manifest(manifest), root)
    assert sha256_file(root / ".downloads" / whl.name) == sha256_file(whl)
    assert not list((root / ".downloads").glob(".*.part"))


# -- the shipped manifests ----------------------------------------------------------------------
def test_shipped_public_manifest_is_well_formed():
    m = load_manifest(REPO / "data_manifests" / "public_brain.yaml")
    vols = m.volumes()
    assert len({v.id for v in vols}) == len(vols)
    splits: dict[str, set[str]] = {}
    for v in vols:
        splits.setdefault(v.subject, set()).add(v.split)
    assert all(len(s) == 1 for s in splits.values())  # split by subject
    for split in ("train", "val", "test"):
        assert any(not v.optional for v in m.volumes(split)), f"no required {split} volume"
    for v in m.volumes("val") + m.volumes("test"):
        assert v.kind == "individual", v.id  # real single subjects, never a template
    assert any(v.kind == "individual" and v.shape and v.shape[2] > 1 and not v.optional
               for v in m.volumes("test")), "no required 3-D test volume"
    # Colin27 must not leak: every copy of that person on one side
    colin = {v.split for v in vols if "colin" in v.subject or "ch2" in v.path}
    assert len(colin) == 1
    for v in vols:
        p = v.provenance
        assert p.source in m.sources and p.member, v.id
        src = m.sources[p.source]
        assert p.version == src.version and src.filename and src.sha256, v.id
        assert (p.convert == "copy") == (p.member_sha256 is None), v.id
        assert not v.path.startswith(".downloads"), v.id
        assert v.optional == src.optional, v.id


def test_template_manifest_is_valid():
    m = load_manifest(REPO / "data_manifests" / "TEMPLATE.yaml")
    assert {v.split for v in m.volumes()} == {"train", "test"}


# -- loading (MONAI) ----------------------------------------------------------------------------
@pytest.fixture
def slice_data(tmp_path):
    root = tmp_path / "root"
    # an oblique-free but permuted/flipped affine (LPS-like axis order) and anisotropic voxels
    aff = np.array([[0, 0, -3.0, 40], [-2.0, 0, 0, 30], [0, 2.0, 0, -20], [0, 0, 0, 1]])
    a = save(root / "a.nii.gz", brain((20, 24, 12), 0), aff)
    b = save(root / "b.nii.gz", brain((16, 16, 10), 1)[..., None])
    c = save(root / "c.nii.gz", brain((18, 14, 8), 2))
    vols = [entry("a", "a.nii.gz", sha256_file(a), "p1", "train"),
            entry("b", "b.nii.gz", sha256_file(b), "p2", "train"),
            entry("c", "c.nii.gz", sha256_file(c), "p3", "test"),
            entry("d", "d.nii.gz", "0" * 64, "p4", "test", optional=True)]
    return load_manifest(write_manifest(tmp_path, vols)), root


def test_slice_dataset_items(slice_data):
    from recon.data.loading import slice_dataset

    manifest, root = slice_data
    ds = slice_dataset(manifest, root, "train", size=16, axis="axial", min_foreground=0.05)
    assert len(ds) > 0
    item = ds[0]
    assert item["image"].shape == (1, 16, 16) and item["image"].dtype == torch.float32
    assert item["volume_id"] in {"a", "b"} and isinstance(item["slice_index"], int)
    x = ds.tensor()
    assert x.shape == (len(ds), 1, 16, 16) and float(x.min()) >= 0 and float(x.max()) <= 1
    assert float(x.amax(dim=(1, 2, 3)).min()) > 0.5  # no empty slice kept
    # empty first/last slices are skipped: fewer kept than in the volumes
    counts = ds.counts()
    assert counts["b"] < 10 and counts["a"] < ds.geometry["a"].n_slices
    ds_all = slice_dataset(manifest, root, "train", size=16, min_foreground=0.0)
    assert len(ds_all) == ds_all.geometry["a"].n_slices + 10
    # the missing optional test volume is skipped, the other one loads
    test = slice_dataset(manifest, root, "test", size=16)
    assert set(test.volumes) == {"c"}


def test_slice_dataset_cache_is_reused(slice_data, tmp_path, monkeypatch):
    from monai.data import NibabelReader

    from recon.data.loading import slice_dataset

    manifest, root = slice_data
    calls = []
    real_read = NibabelReader.read

    def counting_read(self, data, **kw):
        calls.append(data)
        return real_read(self, data, **kw)

    monkeypatch.setattr(NibabelReader, "read", counting_read)
    cache = tmp_path / "cache"
    first = slice_dataset(manifest, root, "train", size=16, cache_dir=cache)
    assert len(calls) == 2 and len(list(cache.glob("*.pt"))) == 2
    second = slice_dataset(manifest, root, "train", size=16, cache_dir=cache)
    assert len(calls) == 2  # nothing re-read or re-transformed
    torch.testing.assert_close(first.tensor(), second.tensor())
    slice_dataset(manifest, root, "train", size=8, cache_dir=cache)  # other settings: new entries
    assert len(calls) == 4 and len(list(cache.glob("*.pt"))) == 4


def test_physical_aspect_and_orientation(slice_data):
    from recon.data.loading import load_volume

    _, root = slice_data
    vol = load_volume(root / "a.nii.gz", size=32, axis=2)
    g = vol.geometry
    # file axes (i, j, k) map to RAS (y, z, x) flipped: RAS shape (12, 20, 24), axial = 24
    assert g.ras_shape == (12, 20, 24) and len(vol) == 24
    # RAS x spacing 3 mm (12 voxels = 36 mm), y 2 mm (20 voxels = 40 mm): physical aspect kept
    assert g.native_hw == (20, 12) and g.resized_hw == (32, 29)
    assert g.pad == (0, 1) and g.pixel_mm == pytest.approx(40 / 32)


def test_round_trip_to_native_grid(slice_data, tmp_path):
    from recon.data.loading import load_volume

    _, root = slice_data
    src = root / "a.nii.gz"
    data, affine, header = read_nifti(src)
    # size equal to the native in-plane extent in voxels along the longer axis and isotropic
    # voxels: no resizing, so the way back is exact (orientation, layout, padding, intensity)
    iso = save(tmp_path / "iso.nii.gz", data, np.array(
        [[0, 0, -2.0, 40], [-2.0, 0, 0, 30], [0, 2.0, 0, -20], [0, 0, 0, 1]]))
    vol = load_volume(iso, size=24, axis=1)
    assert vol.geometry.resized_hw == vol.geometry.native_hw
    lo, hi = vol.geometry.intensity
    back = vol.to_native(vol.slices)
    np.testing.assert_allclose(back, np.clip(data, lo, hi), rtol=1e-5, atol=1e-3)
    # with resizing: same grid, close values; the NIfTI overlays the input
    vol = load_volume(src, size=16, axis=2)
    out = vol.save(vol.slices, tmp_path / "recon.nii.gz")
    rec, aff2, hdr2 = read_nifti(out)
    assert rec.shape == data.shape
    np.testing.assert_array_equal(aff2, affine)
    assert hdr2.get_zooms() == header.get_zooms()
    assert np.corrcoef(rec.ravel(), data.ravel())[0, 1] > 0.9
    # a subset of slices, rest filled; indices/batches stream through the volume
    keep = vol.indices(max_slices=4)
    assert len(keep) == 4 and keep == sorted(keep)
    got = []
    for idx, batch in vol.batches(3, keep):
        assert batch.shape == (len(idx), 1, 16, 16)
        got += idx
    assert got == keep
    part = vol.to_native(vol.slices[keep], keep, rescale=False, fill=-1.0)
    assert (part == -1.0).sum() == data.size - 4 * 20 * 12  # 4 axial slices of 20 x 12
    with pytest.raises(ValueError, match="indices"):
        vol.to_native(vol.slices[keep], keep[:2])


def test_loading_rejects_multi_frame_and_nan(tmp_path):
    from recon.data.loading import load_volume

    four = save(tmp_path / "four.nii.gz", np.stack([brain()] * 2, -1))
    with pytest.raises(DataError, match=r"'four.nii.gz'.*2 channel\(s\)/frame\(s\)"):
        load_volume(four)
    nan = brain()
    nan[5, 5, 5] = np.nan
    with pytest.raises(DataError, match="non-finite"):
        load_volume(save(tmp_path / "nan.nii.gz", nan))
    (tmp_path / "bad.nii.gz").write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(DataError, match="cannot load/preprocess"):
        load_volume(tmp_path / "bad.nii.gz")


# -- the native grid and foreground normalisation -----------------------------------------------
def test_native_grid_keeps_odd_non_square_slices_and_round_trips(tmp_path):
    """size=None: slices on the file's own in-plane grid (odd, non-square, anisotropic), no
    resampling, and the way back onto the file's grid is exact."""
    from recon.data.loading import load_volume
    from recon.data.slicing import SliceConfig

    data = brain((21, 34, 9), 3)
    path = save(tmp_path / "odd.nii.gz", data, np.diag([0.8, 1.1, 3.0, 1.0]))
    for normalise in ("percentile", "foreground"):
        vol = load_volume(path, config=SliceConfig(size=None, axis=2, normalise=normalise))
        assert vol.slices.shape == (9, 1, 34, 21)  # RAS axial slices in viewer layout (H=y, W=x)
        assert vol.geometry.grid_hw == (34, 21) and vol.geometry.native_hw == (34, 21)
        back = vol.to_native(vol.slices, rescale=True)
        lo, hi = vol.geometry.intensity
        expect = np.clip(data, lo, lo + (hi - lo) * (1.0 if normalise == "percentile" else 1.5))
        np.testing.assert_allclose(back, expect, rtol=1e-5, atol=1e-3 * (hi - lo))


def _head(skull: bool, size=(64, 64, 16)) -> np.ndarray:
    """A 'brain' ellipsoid (tissue 100 +- texture) in background 0, optionally inside a scalp
    ring three times as bright (fat) with a dark bone gap between them."""
    grids = np.meshgrid(*[np.linspace(-1.2, 1.2, n) for n in size[:2]], indexing="ij")
    r = np.sqrt(grids[0] ** 2 + grids[1] ** 2)
    plane = (r < 0.7) * (100 + 20 * np.sin(9 * grids[0]) * np.cos(7 * grids[1]))
    if skull:
        plane = plane + ((r > 0.78) & (r < 0.95)) * 300.0
    return np.repeat(plane[..., None], size[2], axis=2).astype(np.float32)


def test_foreground_normalisation_does_not_depend_on_the_skull(tmp_path):
    """The same brain with and without a bright scalp: percentile scaling (0.5/99.5 of the
    volume) puts the brain at a third of its skull-stripped level; foreground scaling (head
    median -> 0.5) keeps it within 10 %."""
    from recon.data.loading import load_volume
    from recon.data.slicing import SliceConfig

    brain_mask = None
    levels = {}
    for skull in (False, True):
        path = save(tmp_path / f"head{int(skull)}.nii.gz", _head(skull), np.eye(4))
        for normalise in ("percentile", "foreground"):
            vol = load_volume(path, config=SliceConfig(size=None, axis=2, normalise=normalise))
            x = vol.slices[8, 0].numpy()
            if brain_mask is None:
                brain_mask = x > 0.05
            levels[skull, normalise] = float(np.median(x[brain_mask]))
    ratio = {n: levels[True, n] / levels[False, n] for n in ("percentile", "foreground")}
    assert ratio["percentile"] < 0.5, ratio
    assert abs(ratio["foreground"] - 1.0) < 0.1, ratio
