"""The docs stay true: README.md and docs/USAGE.md name only commands, flags and files that exist,
and the README's headline table is the committed metrics.

- every `datm <command>` written in code (inline spans and shell blocks) is a command of the CLI,
  and every flag after it is one that command (or `datm` itself) takes; in the command table a
  row's flags belong to the row's command; a bare flag span is a flag of some datm command (or of
  the export's reproduce.py, or one of a short list of other tools' flags);
- every file path named exists in the repository, or is one a run or an export writes
  (`WRITTEN`, an explicit list); links into a Markdown file point at a heading it has;
- the table between `<!-- results:begin -->` and `<!-- results:end -->` has one row per IPC of
  params.yaml's distill.ipcs, each equal to the committed metrics/evaluate/ipc_<N>.json (the
  percent of each fraction with 2 decimals, "70.66 ± 2.16");
- the README stays a guide (at most 260 lines) and no guide holds a commit hash.

The checkers are plain functions of a text, so the tests at the end feed them a README with a
renamed flag, command, file and number, and require each break to be reported.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from fnmatch import fnmatch
from functools import cache
from pathlib import Path

import pytest
import typer
import yaml
from helpers import REPO

from cli.main import app

README = REPO / "README.md"
GUIDES = [README, REPO / "docs" / "USAGE.md"]
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
COLUMNS = ["IPC", "distilled", "its initialization", "random real", "full set (experts)"]
KEYS = ["distilled", "init", "random_real", "full_dataset"]  # the columns after IPC, in order
MAX_README_LINES = 260

# Files that a run (`dvc repro`, a stage, MLflow) or an export writes: named in the guides, never
# in git. Anything else a guide names must be in the repository. N, NNN and NAME stand for any
# value (ipc_N.json, expert_NNN.safetensors, presets/NAME.yaml).
WRITTEN = [
    "data/train.safetensors", "data/test.safetensors", "artifacts/zca.safetensors",
    "artifacts/buffers/expert_*.safetensors", "artifacts/distilled/ipc_*.safetensors",
    "checkpoints/distill_ipc_*.safetensors", "metrics/buffers.json",
    "metrics/evaluate/ipc_*.json", "metrics/baseline/ipc_*.json", "metrics/crossarch/ipc_*.json",
    "metrics/decompose/ipc_*.json", "reports/summary.md", "summary.md",
    "reports/accuracy_vs_ipc.png", "accuracy_vs_ipc.png", "reports/grid_ipc_*.png",
    "grid_ipc_*.png", "grid_init.png", "grid_final.png", "mlflow.db", "dvc.lock",
    "dvc_plots/index.html",
    # an export folder (datm/export.py), bare or under exports/
    *(f"{where}{name}" for where in ("", "exports/*/")
      for name in ("images.safetensors", "images.pt", "images.npz", "labels.safetensors",
                   "zca.safetensors", "dataset_card.json", "metadata.jsonl", "reproduce.py")),
    # a set saved by the DATM / MTT code (`datm evaluate --from`)
    "images_best.pt", "labels_best.pt", "lr_best.pt",
]
# Flags of other tools that a guide writes on their own in a code span
OTHER_FLAGS = {"--master_addr", "-n", "-m"}

FILE = re.compile(r"(?<![\w./-])((?:\.\./)*(?:[\w.-]+/)*[\w-]+\.(?:py|yaml|yml|json|jsonl|md|png|sh|"
                  r"cff|lock|toml|safetensors|pt|npz|db|html|csv|txt))(?![\w/-])")
PLACEHOLDER = re.compile(r"(?<![A-Za-z])(?:NNN|NAME|N)(?![A-Za-z])")
FLAG = re.compile(r"(?<![\w-])(--?[a-zA-Z][\w-]*)")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
SPAN = re.compile(r"`([^`]+)`")
SHELL = ("bash", "sh", "shell", "console", "")
HASH = re.compile(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}\b")


# --- what exists -------------------------------------------------------------------------------

@cache
def _cli():
    return typer.main.get_command(app)


def _options(command: str | None) -> set[str]:
    cmd = _cli() if command is None else _cli().get_command(None, command)
    return {opt for param in cmd.params for opt in (*param.opts, *param.secondary_opts)}


@cache
def _commands() -> frozenset[str]:
    return frozenset(_cli().commands)


@cache
def _all_flags() -> frozenset[str]:
    return frozenset(set().union(*(_options(c) for c in _commands())) | _options(None))


@cache
def _snippet_flags() -> frozenset[str]:
    """The flags of an export's reproduce.py (datm/export_snippet.py, copied)."""
    source = (REPO / "datm" / "export_snippet.py").read_text()
    return frozenset(re.findall(r"add_argument\(\"(--[\w-]+)\"", source)) | {"--help"}


@cache
def _tracked() -> tuple[str, ...]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                         cwd=REPO, capture_output=True, text=True, check=True)
    return tuple(p for p in out.stdout.splitlines() if (REPO / p).exists())


# --- commands and flags ------------------------------------------------------------------------

def _code(text: str) -> tuple[list[str], list[str]]:
    """(shell command lines, inline code spans) of a Markdown text; the table rows stay in the
    text with their spans. Comments in shell blocks are prose and are left out."""
    lines = []
    for lang, body in FENCE.findall(text):
        if lang in SHELL:
            lines += [re.sub(r"(^|\s)#.*", "", line) for line in body.splitlines()]
    prose = FENCE.sub("", text)
    spans = [" ".join(s.split()) for s in SPAN.findall(prose)]
    return lines, spans


def _segments(code: str) -> list[list[str]]:
    return [seg.split() for seg in re.split(r"&&|\|\||;|\s\|\s", code) if seg.strip()]


def _check_segment(tokens: list[str], where: str) -> list[str]:
    """Problems of one command: `datm <command> [flags]` or `reproduce.py [flags]`."""
    names = [t.rsplit("/", 1)[-1] for t in tokens]
    if "datm" in names:
        rest = tokens[names.index("datm") + 1:]
        if not rest or rest[0].startswith(("<", "-")):  # `datm --version`, `datm <command>`
            known, command = _options(None) | {"--help"}, "datm"
        elif rest[0] not in _commands():
            return [f"{where}: `datm {rest[0]}` is not a datm command "
                    f"(commands: {', '.join(sorted(_commands()))})"]
        else:
            command = f"datm {rest[0]}"
            known, rest = _options(rest[0]) | _options(None) | {"--help"}, rest[1:]
    elif "reproduce.py" in names:
        rest, known, command = tokens[names.index("reproduce.py") + 1:], _snippet_flags(), \
            "reproduce.py"
    else:
        return []
    flags = {f for token in rest for f in FLAG.findall(token)}
    return [f"{where}: `{command}` has no flag {flag}" for flag in sorted(flags - known)]


def command_problems(text: str, where: str = "README.md") -> list[str]:
    lines, spans = _code(text)
    problems = []
    for code in lines + spans:
        for tokens in _segments(code):
            problems += _check_segment(tokens, where)
    for span in spans:  # a flag on its own: one of datm's, reproduce.py's or a listed tool's
        if span.startswith("-"):
            for flag in FLAG.findall(span):
                if flag not in _all_flags() | _snippet_flags() | OTHER_FLAGS:
                    problems.append(f"{where}: `{span}` names {flag}, which no datm command takes")
    for row in (line for line in FENCE.sub("", text).splitlines() if line.startswith("|")):
        cells = [" ".join(s.split()) for s in SPAN.findall(row)]
        lead = cells[0].split() if cells else []
        if len(lead) >= 2 and lead[0] == "datm" and lead[1] in _commands():
            known = _options(lead[1]) | _options(None) | {"--help"}
            for flag in sorted({f for c in cells[1:] if c.startswith("-") for f in FLAG.findall(c)}
                               - known):
                problems.append(f"{where}: the table row of `datm {lead[1]}` names {flag}, "
                                "which that command does not take")
    return problems


# --- files and links ---------------------------------------------------------------------------

def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text())
    return {_slug(h) for h in re.findall(r"^#+\s+(.*)$", text, re.M)}


def _exists(name: str, folder: str) -> bool:
    pattern = PLACEHOLDER.sub("*", name)
    candidates = {os.path.normpath(pattern)}
    if folder:
        candidates.add(os.path.normpath(os.path.join(folder, pattern)))
    if any(fnmatch(c, w) for c in candidates for w in WRITTEN):
        return True
    tracked = _tracked()
    if "/" not in pattern:  # a bare file name (the layout tree, an export's file): anywhere
        return any(fnmatch(p.rsplit("/", 1)[-1], pattern) for p in tracked)
    return any(fnmatch(p, c) for p in tracked for c in candidates)


def path_problems(text: str, where: str = "README.md") -> list[str]:
    folder = os.path.dirname(where)
    problems = [f"{where} names {name}, which is neither in the repository nor a file datm "
                "writes (tests/test_docs.py, WRITTEN)"
                for name in sorted(set(FILE.findall(text))) if not _exists(name, folder)]
    for target, anchor in re.findall(r"\]\(([^)#\s]+\.md)#([^)\s]+)\)", text):
        path = REPO / os.path.normpath(os.path.join(folder, target))
        if path.is_file() and anchor not in _anchors(path):
            problems.append(f"{where} links to {target}#{anchor}, a heading {target} lacks")
    return problems


# --- the headline table ------------------------------------------------------------------------

def _cell(value, std) -> str:
    if value is None:
        return "—"
    return f"{100 * value:.2f} ± {100 * std:.2f}"


def table_rows(text: str) -> list[list[str]]:
    assert BEGIN in text and END in text, f"README.md lacks the markers {BEGIN} ... {END}"
    block = text.split(BEGIN, 1)[1].split(END, 1)[0]
    rows = [[c.strip().strip("*").strip() for c in line.strip().strip("|").split("|")]
            for line in block.strip().splitlines() if line.strip().startswith("|")]
    assert rows and rows[0] == COLUMNS, f"the headline table's columns must be {COLUMNS}"
    return [r for r in rows[1:] if not set("".join(r)) <= set("-: ")]


def table_problems(text: str, metrics: dict[int, dict], ipcs: list[int]) -> list[str]:
    rows = table_rows(text)
    problems = []
    if [r[0] for r in rows] != [str(i) for i in ipcs]:
        problems.append(f"the headline table's IPCs are {[r[0] for r in rows]}, params.yaml's "
                        f"distill.ipcs {ipcs}")
    for row in rows:
        m = metrics.get(int(row[0])) if row[0].isdigit() else None
        if m is None:
            continue
        for key, cell in zip(KEYS, row[1:], strict=True):
            for k in (key, f"{key}_std"):
                v = m.get(k)
                if v is not None and not 0 <= v <= 1:
                    problems.append(f"metrics/evaluate/ipc_{row[0]}.json: {k} = {v} is no "
                                    "fraction in [0, 1]")
            want = _cell(m.get(key), m.get(f"{key}_std"))
            if cell != want:
                problems.append(f"IPC {row[0]}, {key}: the README says {cell!r}, "
                                f"metrics/evaluate/ipc_{row[0]}.json {want!r}")
    return problems


# --- the tests ---------------------------------------------------------------------------------

@pytest.mark.parametrize("guide", GUIDES, ids=lambda p: p.name)
def test_every_datm_command_and_flag_named_exists(guide):
    problems = command_problems(guide.read_text(), str(guide.relative_to(REPO)))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("guide", GUIDES, ids=lambda p: p.name)
def test_every_file_named_exists(guide):
    problems = path_problems(guide.read_text(), str(guide.relative_to(REPO)))
    assert not problems, "\n".join(problems)


def _committed(path: str) -> str | None:
    """The file as the checked-out commit holds it (a run of the pipeline here rewrites the
    working copy with this machine's rounding), else the working copy (about to be committed)."""
    out = subprocess.run(["git", "show", f"HEAD:{path}"], cwd=REPO, capture_output=True,
                         text=True)
    if out.returncode == 0:
        return out.stdout
    return (REPO / path).read_text() if (REPO / path).is_file() else None


def test_the_headline_table_equals_the_committed_metrics():
    ipcs = list(yaml.safe_load((REPO / "params.yaml").read_text())["distill"]["ipcs"])
    texts = {ipc: _committed(f"metrics/evaluate/ipc_{ipc}.json") for ipc in ipcs}
    missing = [f"metrics/evaluate/ipc_{ipc}.json" for ipc, t in texts.items() if t is None]
    assert not missing, (f"the README's headline table is checked against {', '.join(missing)}, "
                         "which are not committed: commit the default run's metrics/evaluate/")
    metrics = {ipc: json.loads(t) for ipc, t in texts.items()}
    problems = table_problems(README.read_text(), metrics, ipcs)
    assert not problems, "\n".join(problems)


def test_the_readme_is_a_guide():
    lines = README.read_text().count("\n")
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines (at most {MAX_README_LINES}; " \
        "reference detail goes to docs/USAGE.md)"
    for guide in [README, *sorted((REPO / "docs").glob("*.md"))]:
        found = HASH.findall(guide.read_text())
        assert not found, f"{guide.relative_to(REPO)} holds commit hashes {found[:3]}: history " \
            "goes to CHANGELOG.md and bench/RESULTS.md"


# --- the checks catch what they are for -------------------------------------------------------

def test_a_renamed_flag_command_or_file_is_reported():
    text = README.read_text()
    assert "datm evaluate --from" in text and "datm export" in text
    renamed_flag = text.replace("--from", "--source")
    assert any("`datm evaluate` has no flag --source" in p for p in command_problems(renamed_flag))
    renamed_cell = text.replace("`--no-measure`", "`--no-measuring`")
    assert any("--no-measuring" in p for p in command_problems(renamed_cell))
    renamed_command = text.replace("datm export --ipc", "datm exports --ipc")
    assert any("`datm exports` is not a datm command" in p
               for p in command_problems(renamed_command))
    renamed_file = text.replace("docs/OWN_DATA.md", "docs/OWN-DATA.md")
    assert any("docs/OWN-DATA.md" in p for p in path_problems(renamed_file))
    bad_anchor = text.replace("USAGE.md#scale-out", "USAGE.md#scaling-out")
    assert any("#scaling-out" in p for p in path_problems(bad_anchor))


def test_a_table_off_by_one_digit_is_reported():
    m = {"distilled": 0.7066, "distilled_std": 0.0216, "init": 0.5, "init_std": 0.01,
         "random_real": 0.5544, "random_real_std": 0.0304, "full_dataset": 0.9107,
         "full_dataset_std": 0.0014}
    row = "| 1 | **70.66 ± 2.16** | 50.00 ± 1.00 | 55.44 ± 3.04 | 91.07 ± 0.14 |"
    table = "\n".join([BEGIN, "| " + " | ".join(COLUMNS) + " |", "|---:|---:|---:|---:|---:|",
                       row, END])
    assert table_problems(table, {1: m}, [1]) == []
    assert table_problems(table.replace("70.66", "70.67"), {1: m}, [1])
    assert table_problems(table, {1: m}, [1, 10])  # an IPC of distill.ipcs without its row
    assert table_problems(table, {1: {**m, "init": 50.0}}, [1])  # percent, not a fraction
