"""The documentation a user reads: README.md, docs/*.md and the notebook's script.

Every relative link resolves to a file inside the repository (and a #section to a heading of the page it names),
no page points at a folder beside the repository, and every `python X.py ...` command in the README's code
blocks is accepted by X.py's own argument parser: its --help exits 0 and lists each flag the command uses, and
where X.py exposes its parser the whole command line parses, values included; docs/method.md's architecture table
matches ibot_min.ARCHS. Nothing here needs data or a GPU.
"""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import ibot_min as M

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
NOTEBOOK = ROOT / "notebooks" / "ibot_walkthrough.py"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md")), NOTEBOOK]

FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"\[[^\]\n]*\]\(([^()\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)


def prose(page: Path) -> str:
    """The text in which links live: Markdown without its code (fenced blocks, inline spans); for the notebook's
    percent-format script, its comment lines (the Markdown cells) without the leading '# '."""
    text = page.read_text()
    if page.suffix == ".py":
        text = "\n".join(line[2:] if line.startswith("# ") else "" for line in text.splitlines())
    return INLINE_CODE.sub("", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation other than '-' and '_' dropped, spaces to '-'."""
    heading = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {slug(h) for h in HEADING.findall(FENCE.sub("", page.read_text()))}


def relative_links(page: Path) -> list[str]:
    return [t for t in LINK.findall(prose(page)) if not re.match(r"[a-z][a-z0-9+.-]*:", t)]  # http:, mailto:


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves_inside_the_repository(page):
    assert page.is_file(), f"{page.relative_to(ROOT)} is missing"
    broken = []
    for target in relative_links(page):
        path, _, fragment = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.is_relative_to(ROOT):
            broken.append(f"{target}: outside the repository")
        elif not resolved.exists():
            broken.append(f"{target}: no such file")
        elif fragment and resolved.suffix == ".md" and fragment not in anchors(resolved):
            broken.append(f"{target}: {resolved.name} has no heading with the anchor #{fragment}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_page_names_a_folder_beside_the_repository(page):
    """Paths in the text (links aside, checked above) are read from the repository root, where commands run."""
    text = re.sub(r"\]\([^)]*\)", "]()", page.read_text())
    named = sorted({m for m in re.findall(r"\.\./(?:\.\./)*[\w.-]+", text) if not (ROOT / m).resolve().is_relative_to(ROOT)})
    assert not named, f"{page.relative_to(ROOT)} names paths outside the repository: {named}"
    assert "SPEC.md" not in text, f"{page.relative_to(ROOT)} cites SPEC.md, which a clone does not have"


def test_the_link_checks_catch_a_broken_link_an_outside_path_and_a_missing_anchor(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Top\n[a](missing.md) [b](../../x.md) [c](#top) [d](#nowhere) `[e](in-code.md)`\n"
                    "```\n[f](in-a-block.md)\n```\n[g](https://example.org)\n")
    assert relative_links(page) == ["missing.md", "../../x.md", "#top", "#nowhere"]
    assert anchors(page) == {"top"}
    assert slug("The official ViT-S/16 recipe") == "the-official-vit-s16-recipe"
    assert slug("`train.py` and [links](x.md)") == "trainpy-and-links"


# ---- the README's commands ----


def readme_commands() -> list[list[str]]:
    """Each command of the README's shell blocks (bash, sh, console; '$ ' lines of console blocks), split at
    '&&', ';' and '|', continuation lines joined, comments and leading VAR=value assignments dropped."""
    commands = []
    for lang, body in FENCE.findall(README.read_text()):
        lang = lang.strip()
        if lang not in ("bash", "sh", "shell", "console", ""):
            continue
        lines = body.replace("\\\n", " ").splitlines()
        if lang == "console":
            lines = [line[2:] for line in lines if line.startswith("$ ")]
        for line in lines:
            words = shlex.split(line, comments=True)
            command = []
            for w in words + ["&&"]:
                if w in ("&&", ";", "|", "||"):
                    while command and re.fullmatch(r"[A-Za-z_]\w*=.*", command[0]):
                        command.pop(0)
                    if command:
                        commands.append(command)
                    command = []
                else:
                    command.append(w)
    return commands


def script_invocations() -> list[tuple[str, list[str]]]:
    """(script path relative to the root, its arguments) for every `python X.py ...` and `torchrun ... X.py ...`."""
    found = []
    for command in readme_commands():
        if command[0] in ("python", "python3") and len(command) > 1 and command[1].endswith(".py"):
            found.append((command[1], command[2:]))
        elif command[0] == "torchrun":
            i = next(i for i, w in enumerate(command) if w.endswith(".py"))
            found.append((command[i], command[i + 1:]))
    return found


def flags(arguments: list[str]) -> set[str]:
    return {a.split("=", 1)[0] for a in arguments if a.startswith("--") and a != "--"}


def parse_in_process(script: str, arguments: list[str]) -> None:
    """The whole command line through the script's own parser, for the scripts that expose it."""
    if script == "train.py":
        import train
        train.parse_args(arguments)
    elif script == "eval_linear.py":
        import eval_linear
        eval_linear.parse_args(arguments)
    elif script == "bench.py":
        import bench
        import train
        _, rest = bench.bench_parser().parse_known_args(arguments)
        train.parse_args(rest)


# scripts without an argument parser: their usage line (printed when called without arguments) is the dry form
USAGE_ONLY = {"plot_run.py", "scripts/ship_model.py"}


@pytest.fixture(scope="module")
def help_texts() -> dict[str, tuple[int, str]]:
    """(exit status, output) of each README script's --help (or, for USAGE_ONLY, of a call without arguments)."""
    scripts = sorted({s for s, _ in script_invocations()})
    env = {k: v for k, v in os.environ.items() if k != "IBOT_CIFAR10_DIR"}
    running = {s: subprocess.Popen([sys.executable, s, *([] if s in USAGE_ONLY else ["--help"])], cwd=ROOT, env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for s in scripts}
    texts = {}
    for script, proc in running.items():  # started together: most of each one's time is importing torch
        out, _ = proc.communicate(timeout=180)
        texts[script] = (proc.returncode, out)
    return texts


def test_the_readme_shows_the_commands_a_user_starts_with():
    invoked = script_invocations()
    assert ("train.py", ["--budget", "5m"]) in invoked
    assert ["python", "-m", "pytest", "-q"] in readme_commands()  # the command .ci/run runs


def test_every_readme_command_names_a_script_in_the_repository():
    missing = sorted({s for s, _ in script_invocations() if not (ROOT / s).is_file()})
    missing += sorted({c[1] for c in readme_commands() if c[0] == "bash" and not (ROOT / c[1]).is_file()})
    assert not missing, f"the README runs scripts that are not in the repository: {missing}"


@pytest.mark.slow
def test_every_readme_command_parses(help_texts, monkeypatch):
    monkeypatch.delenv("IBOT_CIFAR10_DIR", raising=False)  # the commands must parse on a fresh clone
    problems = []
    for script, arguments in script_invocations():
        status, text = help_texts[script]
        if script in USAGE_ONLY:
            if "usage:" not in text:
                problems.append(f"{script}: prints no usage line")
        elif status != 0:
            problems.append(f"{script} --help exited {status}: {text[-500:]}")
        unknown = sorted(f for f in flags(arguments) if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", text))
        if unknown:
            problems.append(f"python {script} {shlex.join(arguments)}: {script} does not list {unknown}")
        try:
            parse_in_process(script, arguments)
        except SystemExit as e:
            problems.append(f"python {script} {shlex.join(arguments)}: its parser refused it (exit {e.code})")
        except ValueError as e:
            problems.append(f"python {script} {shlex.join(arguments)}: {e}")
    assert not problems, "\n".join(problems)


def test_the_method_page_lists_every_architecture_with_its_shape():
    """docs/method.md's architecture table: one row per key of ibot_min.ARCHS, with its D, blocks and heads."""
    row = re.compile(r"^\| `(vit_\w+)`[^|]*\| (\d+) \| (\d+) \| (\d+) \|", re.M)  # | `name` | D | blocks | heads |
    table = row.findall((ROOT / "docs" / "method.md").read_text())
    rows = {name: (int(d), int(blocks), int(heads)) for name, d, blocks, heads in table}
    assert rows == {name: (a["embed_dim"], a["depth"], a["num_heads"]) for name, a in M.ARCHS.items()}
