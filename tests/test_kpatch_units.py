"""AppPot's kernel patch series (core/apppot/kpatches): reading the series,
the cache key, applying it, and how the tools report a patched kernel.
Pure logic and small fake trees: no kernel build."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from apppot import kernel, kernelbuild
from apppot.errors import BuildError
from apppot.kernelbuild import Patch, apply_patches, build_key, patch_series

ORIG = "line one\nline two\nline three\n"
GOOD = """Subject: [PATCH] say two louder

What: changes line two.

--- a/f.txt
+++ b/f.txt
@@ -1,3 +1,3 @@
 line one
-line two
+LINE TWO
 line three
"""
STALE = GOOD.replace(" line one\n", " line zero\n")  # context that is gone


def make_series(root, names, files=None):
    folder = root / "7.2"
    folder.mkdir(parents=True)
    (folder / "series").write_text("# order matters\n\n" + "\n".join(
        names) + "\n")
    for name in files if files is not None else names:
        (folder / name).write_text(f"Subject: {name}\n")
    return folder


def test_series_is_read_in_the_order_of_the_series_file(tmp_path):
    make_series(tmp_path, ["0002-b.patch", "0001-a.patch  # comment"],
                ["0001-a.patch", "0002-b.patch"])
    got = patch_series("7.2", tmp_path)
    assert [p.name for p in got] == ["0002-b.patch", "0001-a.patch"]
    assert got[0].text == "Subject: 0002-b.patch\n"
    assert patch_series("9.9", tmp_path) == ()  # no series: unpatched


@pytest.mark.parametrize("names, files, message", [
    (["0001-a.patch"], ["0001-a.patch", "0002-b.patch"],
     "0002-b.patch is not in"),
    (["0001-a.patch", "0003-c.patch"], ["0001-a.patch"],
     "0003-c.patch does not exist"),
    (["0001-a.patch", "0001-a.patch"], ["0001-a.patch"],
     "0001-a.patch is listed twice"),
])
def test_series_must_say_exactly_what_is_applied(tmp_path, names, files,
                                                 message):
    make_series(tmp_path, names, files)
    with pytest.raises(BuildError, match=message) as e:
        patch_series("7.2", tmp_path)
    assert e.value.hint


def test_patches_without_series_file_are_an_error(tmp_path):
    (tmp_path / "7.2").mkdir()
    (tmp_path / "7.2" / "0001-a.patch").write_text("x")
    with pytest.raises(BuildError, match="has patches but no series file"):
        patch_series("7.2", tmp_path)


def test_key_covers_every_patch_and_stays_for_unpatched_builds():
    frag = "CONFIG_SMP=y\n"
    plain = build_key("7.2", frag)
    assert plain == build_key("7.2", frag, ())  # what pre-series builds had
    a = Patch("0001-a.patch", GOOD)
    keyed = build_key("7.2", frag, (a,))
    assert keyed != plain and keyed.startswith("uml-7.2-")
    assert build_key("7.2", frag, (Patch(a.name, GOOD + " "),)) != keyed
    assert build_key("7.2", frag, (Patch("0001-b.patch", GOOD),)) != keyed
    b = Patch("0002-b.patch", STALE)
    assert build_key("7.2", frag, (a, b)) != build_key("7.2", frag, (b, a))


def test_patch_applies_in_order(tmp_path):
    (tmp_path / "f.txt").write_text(ORIG)
    again = GOOD.replace("-line two\n+LINE TWO", "-LINE TWO\n+Line Two")
    apply_patches(tmp_path, (Patch("0001-a.patch", GOOD),
                             Patch("0002-b.patch", again)), "src 1", "series")
    assert (tmp_path / "f.txt").read_text() == "line one\nLine Two\nline three\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]


@pytest.mark.parametrize("start", [ORIG, ORIG.replace("two", "TWO")],
                         ids=["stale-context", "already-applied"])
def test_patch_that_does_not_apply_fails_naming_it(tmp_path, start):
    """A patch whose context is gone, or one already in the source: the
    build stops with the patch's name, and the tree is left as it was."""
    (tmp_path / "f.txt").write_text(start)
    text = STALE if start == ORIG else GOOD
    with pytest.raises(BuildError) as e:
        apply_patches(tmp_path, (Patch("0002-broken.patch", text),),
                      "linux-source-7.2 7.2.13-1", "kpatches/7.2/series")
    assert str(e.value) == ("kernel patch 0002-broken.patch does not apply "
                            "to linux-source-7.2 7.2.13-1")
    assert "kpatches/7.2/series" in e.value.hint
    assert (tmp_path / "f.txt").read_text() == start
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]


def test_cli_reports_a_broken_patch_in_one_line(tmp_path, monkeypatch):
    """apppot-kernel build: the patch's name on one line, a hint, status 1,
    and no kernel in the cache (here the fetch is faked)."""
    make_series(tmp_path / "kp", ["0001-broken.patch"])
    (tmp_path / "kp" / "7.2" / "0001-broken.patch").write_text(STALE)
    monkeypatch.setattr(kernelbuild, "PATCH_ROOT", tmp_path / "kp")
    monkeypatch.setenv("APPPOT_HOME", str(tmp_path / "home"))

    def fake_fetch(series, aptdir):
        return tmp_path / "src.deb", "7.2.13-1"

    def fake_unpack(deb, series, work):
        tree = work / f"linux-source-{series}"
        tree.mkdir()
        (tree / "f.txt").write_text(ORIG)
        return tree

    monkeypatch.setattr(kernelbuild, "fetch_source", fake_fetch)
    monkeypatch.setattr(kernelbuild, "unpack_source", fake_unpack)
    code = kernelbuild.main(["build"])
    assert code == 1
    home = tmp_path / "home" / "kernels"
    assert not list(home.glob("uml-*")) and not list(home.glob("build-*"))


def test_cli_error_output(tmp_path):
    """The same through the real entry point, in a subprocess: exactly
    ``error:`` and ``hint:`` lines, no traceback."""
    code = f"""
import sys
from pathlib import Path
from apppot import kernelbuild
root = Path({str(tmp_path)!r})
(root / "7.2").mkdir()
(root / "7.2" / "series").write_text("0001-broken.patch\\n")
(root / "7.2" / "0001-broken.patch").write_text({STALE!r})
kernelbuild.PATCH_ROOT = root
kernelbuild.fetch_source = lambda s, a: (root / "x.deb", "7.2.13-1")
def unpack(deb, series, work):
    (work / "t").mkdir(); (work / "t" / "f.txt").write_text({ORIG!r})
    return work / "t"
kernelbuild.unpack_source = unpack
sys.exit(kernelbuild.main(["build"]))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True,
                       text=True, env={"APPPOT_HOME": str(tmp_path / "h"),
                                       "PATH": "/usr/bin:/bin"}, check=False)
    assert r.returncode == 1
    lines = [line for line in r.stderr.splitlines()
             if not line.startswith("[")]  # progress lines
    assert lines == [
        "apppot-kernel: error: kernel patch 0001-broken.patch does not apply "
        "to linux-source-7.2 7.2.13-1",
        f"hint: refresh it against linux-source-7.2 7.2.13-1 or drop it "
        f"from {tmp_path}/7.2/series"], r.stderr


def fake_build(kdir, key, version, patches):
    d = kdir / key
    d.mkdir(parents=True)
    (d / "linux").write_text("")
    (d / "build.json").write_text(json.dumps({
        "version": version, "key": key,
        "patches": [{"name": n} for n in patches]}))
    return d


def test_patched_build_is_preferred_and_pruning_keeps_the_other_kind(
        tmp_path):
    kdir = tmp_path / "kernels"
    plain = fake_build(kdir, "uml-7.2-aaaa", "7.2.13", [])
    old = fake_build(kdir, "uml-7.2-bbbb", "7.2.13", ["0001-a.patch"])
    new = fake_build(kdir, "uml-7.2-cccc", "7.2.13", ["0001-a.patch",
                                                      "0002-b.patch"])
    older = fake_build(kdir, "uml-7.1-dddd", "7.1.1", ["0001-a.patch"])
    kernelbuild.prune(kdir, "7.2", new)
    assert not old.exists() and plain.exists() and older.exists()
    found = [p.parent for p, _ in kernelbuild.built_kernels(tmp_path)]
    assert found == [new, plain, older]
    kernelbuild.prune(kdir, "7.2", plain)
    assert new.exists()


def test_kernel_reports_its_patches(tmp_path):
    d = fake_build(tmp_path, "uml-7.2-aaaa", "7.2.13", ["0001-a.patch"])
    assert kernel._patches(d / "linux") == ("0001-a.patch",)
    assert kernel._patches(Path("/usr/bin/linux.uml")) == ()
    k = kernel.Kernel(d / "linux", "7.2.13", {}, frozenset(),
                      ("0001-a.patch",))
    assert k.has("patched") and "patched" in k.describe()
    assert not kernel.Kernel(d / "linux", "7.2.13", {}).has("patched")
    assert "patched" in kernel.ALL_FEATURES


def test_repository_series_is_complete_and_documented():
    """Every patch in the repository's series has the header the series
    promises (what, why, measured, exposure) and a diff."""
    patches = patch_series(kernelbuild.DEFAULT_SERIES)
    assert patches, "the 7.2 series is empty"
    for p in patches:
        head = p.text.split("\n---\n", 1)[0]
        assert p.text.startswith("From: ") or p.text.startswith("Subject: "), p.name
        for word in ("Subject:", "Measured", "Exposes"):
            assert word in head, f"{p.name}: no {word!r} in its header"
        assert "\n+++ b/" in p.text, f"{p.name}: no diff"
