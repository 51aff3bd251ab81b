"""Lay out the transformers test files the peer suite runs, in a cache folder outside the repository.

Nothing of transformers' test code is kept in this repository. Two sources, both read at run time:

- the common mixins (`tests/test_*.py`: ModelTesterMixin, ConfigTester, PipelineTesterMixin, ...) come from the
  transformers source distribution of the *installed* version, fetched with `pip download` from PyPI;
- the model test files and the helpers the sdist does not ship (`tests/models/<family>/test_modeling_*.py`,
  `tests/generation/test_utils.py`, `tests/exporters/test_export.py`, `tests/utils/test_configuration_utils.py`,
  `tests/vlm_tester.py`, `tests/multimodal_tester.py`) come from a transformers git checkout (a work tree or a bare
  git directory) at a revision you name: `--transformers-src PATH --transformers-rev REV`.

The laid-out tree (`<cache>/tests/...`) gets a `PROVENANCE.json` naming each file's origin and sha256.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
from importlib.metadata import version as package_version
from pathlib import Path

FAMILIES = {
    "llava": ["tests/models/llava/test_modeling_llava.py"],
    "llava_next": ["tests/models/llava_next/test_modeling_llava_next.py"],
    "llava_onevision": ["tests/models/llava_onevision/test_modeling_llava_onevision.py"],
    "qwen2_vl": ["tests/models/qwen2_vl/test_modeling_qwen2_vl.py"],
    "qwen3_vl": ["tests/models/qwen3_vl/test_modeling_qwen3_vl.py"],
    "qwen2_5_vl": ["tests/models/qwen2_5_vl/test_modeling_qwen2_5_vl.py"],
    "internvl": ["tests/models/internvl/test_modeling_internvl.py"],
    "idefics3": ["tests/models/idefics3/test_modeling_idefics3.py"],
    "smolvlm": ["tests/models/smolvlm/test_modeling_smolvlm.py"],
    "gemma3": ["tests/models/gemma3/test_modeling_gemma3.py"],
}

# Helpers the model test files import that the sdist does not ship (it holds only tests/test_*.py).
GIT_HELPERS = [
    "tests/__init__.py",
    "tests/models/__init__.py",
    "tests/generation/__init__.py",
    "tests/generation/test_utils.py",
    "tests/exporters/__init__.py",
    "tests/exporters/test_export.py",
    "tests/utils/__init__.py",
    "tests/utils/test_configuration_utils.py",
    "tests/utils/tiny_model_summary.json",  # read by tests/test_pipeline_mixin.py at import
    "tests/vlm_tester.py",
    "tests/multimodal_tester.py",
    "tests/causal_lm_tester.py",  # the Gemma 3 tests' text-model tester
    "utils/test_module/__init__.py",  # tests/utils/test_configuration_utils.py imports test_module.custom_configuration
    "utils/test_module/custom_configuration.py",
    "utils/fetch_hub_objects_for_ci.py",  # tests/test_*_common.py import url_to_local_path from it
]
TESTING_UTILS = "src/transformers/testing_utils.py"

ENV_SRC = "VTPRUNE_PEER_TRANSFORMERS_SRC"
ENV_REV = "VTPRUNE_PEER_TRANSFORMERS_REV"
ENV_CACHE = "VTPRUNE_PEER_CACHE"


class SourceMissing(RuntimeError):
    """The transformers test files are not laid out and cannot be laid out here."""


def transformers_version() -> str:
    return package_version("transformers")


def default_cache() -> Path:
    root = os.environ.get(ENV_CACHE) or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "vtprune", "peer"
    )
    return Path(root) / f"transformers-{transformers_version()}"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sdist(version: str, work: Path) -> Path:
    """The transformers sdist of `version`, downloaded from PyPI with pip (kept in `work`)."""
    found = sorted(work.glob(f"transformers-{version}.tar.gz"))
    if found:
        return found[0]
    cmd = [sys.executable, "-m", "pip", "download", f"transformers=={version}", "--no-binary", ":all:",
           "--no-deps", "--no-build-isolation", "-q", "-d", str(work)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(work.glob(f"transformers-{version}.tar.gz"))
    if not found:
        raise SourceMissing(f"pip could not download the transformers {version} sdist: {done.stderr.strip()[-400:]}")
    return found[0]


def _git_read(src: Path, rev: str, path: str) -> bytes:
    """One file of a git checkout at `rev` (work tree or bare git directory)."""
    git_dir = src / ".git" if (src / ".git").exists() else src
    done = subprocess.run(["git", "--git-dir", str(git_dir), "show", f"{rev}:{path}"], capture_output=True)
    if done.returncode != 0:
        raise SourceMissing(f"{path} is not in {src} at {rev}: {done.stderr.decode().strip()}")
    return done.stdout


def _git_commit(src: Path, rev: str) -> tuple[str, str]:
    git_dir = src / ".git" if (src / ".git").exists() else src
    done = subprocess.run(["git", "--git-dir", str(git_dir), "log", "-1", "--format=%H %cI", rev],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SourceMissing(f"{src} has no revision {rev}: {done.stderr.strip()}")
    commit, date = done.stdout.split()
    return commit, date


def ensure(families: list[str] | None = None, src: str | None = None, rev: str | None = None,
           cache: Path | None = None) -> Path:
    """The folder holding `tests/` for the given families, laid out now if it is missing or incomplete."""
    families = families or list(FAMILIES)
    cache = cache or default_cache()
    manifest = cache / "PROVENANCE.json"
    wanted = GIT_HELPERS + [p for f in families for p in FAMILIES[f]]
    if manifest.is_file():
        have = json.loads(manifest.read_text())["files"]
        if all(p in have and (cache / p).is_file() for p in wanted):
            return cache
    src = src or os.environ.get(ENV_SRC)
    rev = rev or os.environ.get(ENV_REV) or f"v{transformers_version()}"
    if not src:
        raise SourceMissing(
            f"no transformers test files in {cache}: give a transformers git checkout with --transformers-src PATH "
            f"(or {ENV_SRC}) and its revision with --transformers-rev (default v{transformers_version()})"
        )
    return _lay_out(families, Path(src), rev, cache)


def _lay_out(families: list[str], src: Path, rev: str, cache: Path) -> Path:
    version = transformers_version()
    commit, date = _git_commit(src, rev)
    cache.mkdir(parents=True, exist_ok=True)
    old = json.loads((cache / "PROVENANCE.json").read_text())["files"] if (cache / "PROVENANCE.json").is_file() else {}
    files: dict[str, dict[str, str]] = {}
    for path in GIT_HELPERS + sorted({p for f in FAMILIES for p in FAMILIES[f] if f in families}):
        data = _git_read(src, commit, path)
        (cache / path).parent.mkdir(parents=True, exist_ok=True)
        (cache / path).write_bytes(data)
        files[path] = {"from": "git", "commit": commit, "date": date, "sha256": _sha256(data)}
    for f in FAMILIES:  # each family folder needs its __init__.py
        if f in families:
            init = f"tests/models/{f}/__init__.py"
            data = _git_read(src, commit, init)
            (cache / init).write_bytes(data)
            files[init] = {"from": "git", "commit": commit, "date": date, "sha256": _sha256(data)}
    (cache.parent / "sdist").mkdir(parents=True, exist_ok=True)
    sdist = _sdist(version, cache.parent / "sdist")
    sdist_sha = _sha256(sdist.read_bytes())
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            parts = Path(member.name).parts  # transformers-X/tests/test_*.py, transformers-X/LICENSE
            rel = "/".join(parts[1:])
            if not member.isfile() or not (
                (len(parts) == 3 and parts[1] == "tests" and parts[2].endswith(".py")) or rel == "LICENSE"
            ):
                continue
            data = tar.extractfile(member).read()
            (cache / rel).parent.mkdir(parents=True, exist_ok=True)
            (cache / rel).write_bytes(data)
            files[rel] = {"from": f"sdist transformers-{version}.tar.gz (sha256 {sdist_sha})",
                          "sha256": _sha256(data)}
    files = {**old, **files}
    _link_installed_package(cache)
    compat = _missing_testing_utils_constants(cache, src, commit)
    (cache / "compat.json").write_text(json.dumps(compat, indent=1, sort_keys=True))
    (cache / "pytest.ini").write_text("[pytest]\naddopts = -p no:cacheprovider\n")
    (cache / "PROVENANCE.json").write_text(json.dumps(
        {"transformers": version, "git_source": str(src), "git_rev": rev, "files": files}, indent=1, sort_keys=True))
    return cache


def _link_installed_package(cache: Path) -> None:
    """`src/transformers` -> the installed package: tests/test_pipeline_mixin.py imports it from the repo layout."""
    import transformers

    link = cache / "src" / "transformers"
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(Path(transformers.__file__).parent, target_is_directory=True)


def _missing_testing_utils_constants(cache: Path, src: Path, commit: str) -> dict[str, dict]:
    """Constants the laid-out files import from `transformers.testing_utils` that the installed version lacks.

    The git revision's test files can be newer or older than the installed library; where one imports a plain
    constant (a literal) that the installed `testing_utils` no longer has, its value is read from that revision's
    `testing_utils.py` (never executed) and the plugin sets it before collection. Anything else stays missing and
    shows up as a collection error of the dense run.
    """
    import transformers.testing_utils as installed

    wanted: set[str] = set()
    for path in (cache / "tests").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_bytes())):
            if isinstance(node, ast.ImportFrom) and node.module == "transformers.testing_utils":
                wanted |= {a.name for a in node.names if not hasattr(installed, a.name)}
    if not wanted:
        return {}
    found = {}
    for node in ast.parse(_git_read(src, commit, TESTING_UTILS)).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            if name in wanted:
                try:
                    found[name] = {"value": ast.literal_eval(node.value), "from": f"{TESTING_UTILS} at {commit}"}
                except ValueError:
                    pass
    return found


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="*", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--transformers-src", default=None)
    parser.add_argument("--transformers-rev", default=None)
    parser.add_argument("--cache", type=Path, default=None)
    parser.add_argument("--force", action="store_true", help="lay out again even when the cache is complete")
    args = parser.parse_args(argv)
    cache = args.cache or default_cache()
    if args.force and cache.exists():
        shutil.rmtree(cache)
    print(ensure(args.families, args.transformers_src, args.transformers_rev, cache))


if __name__ == "__main__":
    main()
