#!/usr/bin/env python3
"""The guard of the README's two commands on a fresh machine.

Lists every external command that scripts/ runs, and every program the tests
start (from the Rust sources), and fails unless each one is on the base machine
(scripts/base-commands.txt, checked against this machine) or installed by the
scripts before it is used: within the same shell function (or script), a call
to a function that installs it must come first, or the use must be guarded by
`have NAME` / `command -v NAME`. A function installs NAME when it checks for it
(`have NAME`, `command -v NAME`) and installs something (apt, pip, cargo
install, rustup, install). So whichever path through the scripts runs first,
nothing is called before it is there.

`scripts/check-tools.py` checks this checkout; `--root DIR` another one; `--list`
prints each command with where it comes from.
"""

import argparse
import re
import shutil
import sys
from pathlib import Path

BUILTINS = set(
    """
    . : [ alias bg bind break builtin caller cd command compgen complete compopt
    continue declare dirs disown echo enable eval exec exit export false fc fg
    getopts hash help history jobs kill let local logout mapfile popd printf
    pushd pwd read readarray readonly return set shift shopt source suspend test
    times trap true type typeset ulimit umask unalias unset wait
    """.split()
)
KEYWORDS = set("if then else elif fi do done while until case esac in function select time ! { } [[ ]]".split())
# Words that run the command after them.
PREFIXES = {"exec", "command", "sudo", "$sudo", "nohup", "env", "builtin"}
# Words that run the command after their options (and timeout's duration).
PREFIXES_WITH_OPTIONS = {"timeout", "stdbuf"}
INSTALLERS = re.compile(r"\b(apt_install|apt-get install|install_wheel_binary|cargo\w* \S+ install|rustup|install -m)\b")
SEPARATORS = {";", "\n", "|", "||", "&", "&&", "(", "{", "|&", "$(", "<(", ">("}


def lex(text):
    """Shell tokens: ('word', text) and ('op', text); a command substitution inside
    a word is returned too, as ('sub', its text), to be analysed on its own."""
    tokens, i, n = [], 0, len(text)
    word, in_word = [], False

    def end_word():
        nonlocal word, in_word
        if in_word:
            tokens.append(("word", "".join(word), word_start))
        word, in_word = [], False

    def balanced(start):
        """The index after the `)` closing the `$(` whose `(` is at start - 1."""
        depth, j, quote = 1, start, None
        while j < n:
            c = text[j]
            if quote:
                if c == "\\" and quote == '"':
                    j += 1
                elif c == quote:
                    quote = None
            elif c in "'\"":
                quote = c
            elif c == "\\":
                j += 1
            elif c == "(":
                depth += 1
            elif c == ")":
                depth -= 1
                if depth == 0:
                    return j + 1
            j += 1
        raise ValueError("unbalanced $(")

    quote, word_start = None, 0
    while i < n:
        c = text[i]
        if not in_word:
            word_start = i
        if quote == "'":
            word.append(c)
            if c == "'":
                quote = None
            i += 1
            continue
        if c == "\\" and i + 1 < n:
            if text[i + 1] != "\n":
                word.append(text[i : i + 2])
                in_word = True
            i += 2
            continue
        if text.startswith("$((", i):
            end = balanced(i + 2)
            word.append(text[i:end])
            in_word = True
            i = end
            continue
        if text.startswith("$(", i) or (quote is None and text[i : i + 2] in ("<(", ">(") and not in_word):
            end = balanced(i + 2)
            tokens.append(("sub", text[i + 2 : end - 1], i))
            word.append(text[i:end])
            in_word = True
            i = end
            continue
        if quote == '"':
            word.append(c)
            if c == '"':
                quote = None
            i += 1
            continue
        if c in "'\"":
            quote = c
            word.append(c)
            in_word = True
            i += 1
            continue
        if c == "#" and not in_word:
            while i < n and text[i] != "\n":
                i += 1
            continue
        if c in " \t\r":
            end_word()
            i += 1
            continue
        if c in ";&|()\n<>":
            if c in "<>" and in_word and re.fullmatch(r"\d+|\{\w+\}", "".join(word)):
                # A redirection of a numbered or named descriptor: `2>&1`, `{fd}>&-`.
                operator = re.match(r"[<>]+&?", text[i:]).group(0)
                word.append(operator)
                i += len(operator)
                continue
            end_word()
            for op in (";;", "||", "&&", "|&", "((", "))", "<<", ">>", ">&", "<>", "&>"):
                if text.startswith(op, i):
                    tokens.append(("op", op, i))
                    i += len(op)
                    break
            else:
                tokens.append(("op", c, i))
                i += 1
            continue
        word.append(c)
        in_word = True
        i += 1
    end_word()
    return tokens


def strip_heredocs(text):
    """The text without the bodies of here-documents (another language's code)."""
    out, lines, i = [], text.split("\n"), 0
    while i < len(lines):
        line = lines[i]
        out.append(line)
        found = re.search(r"<<-?\s*['\"]?(\w+)['\"]?", line)
        i += 1
        if found and "<<<" not in line:
            while i < len(lines) and lines[i].strip() != found.group(1):
                i += 1
            i += 1
    return "\n".join(out)


def unquote(word):
    return word.replace('"', "").replace("'", "")


def commands(text, outer_line=None):
    """The simple commands of shell `text`, in order: (first word, its line)."""
    found = []
    text = strip_heredocs(text)
    lexed = lex(text)
    tokens = [(kind, value) for kind, value, _ in lexed]
    starts = [at for _, _, at in lexed]

    def line_of(index):
        if outer_line is not None:
            return outer_line
        at = starts[index]
        return text[text.rfind("\n", 0, at) + 1 : (text.find("\n", at) + 1 or len(text) + 1) - 1]

    at_start = True
    skip = None  # what ends a stretch that holds no command: "))", "]]", "for", "case"
    cases = []  # per open `case`: "pattern" or "body"
    i = 0
    while i < len(tokens):
        kind, value = tokens[i]
        i += 1
        if kind == "sub":
            found.extend(commands(value, line_of(i - 1)))
            continue
        if skip == "))":
            skip = None if value == "))" else skip
            continue
        if skip == ")":
            skip = None if (kind, value) == ("op", ")") else skip
            continue
        if skip == "]]":
            skip = None if (kind, value) == ("word", "]]") else skip
            continue
        if skip == "for":
            if kind == "op" and value in (";", "\n"):
                skip, at_start = None, True
            continue
        if skip == "case":
            if (kind, value) == ("word", "in"):
                skip = None
                cases.append("pattern")
            continue
        if cases and cases[-1] == "pattern":
            if (kind, value) == ("op", ")"):
                cases[-1], at_start = "body", True
            elif (kind, value) == ("word", "esac"):
                cases.pop()
            continue
        if kind == "op":
            if value == "(" and i >= 2 and tokens[i - 2][0] == "word" and tokens[i - 2][1].endswith("="):
                skip = ")"  # an array's elements
            elif value == ";;" and cases:
                cases[-1] = "pattern"
            elif value == "((" and at_start:
                skip = "))"
            elif value in SEPARATORS or value == ")":
                at_start = True
            continue
        if not at_start:
            continue
        word = unquote(value)
        if word == "esac" and cases:
            cases.pop()
        elif word == "case":
            skip = "case"
        elif word == "[[":
            skip = "]]"
        elif word in ("for", "select"):
            skip = "for"
        elif word == "command" and i < len(tokens) and tokens[i][1] in ("-v", "-V"):
            i += 1  # a look-up, which runs nothing
        elif word in KEYWORDS or word in PREFIXES or re.fullmatch(r"[A-Za-z_]\w*(\[[^]]*\])?\+?=.*", word, re.S):
            pass  # a keyword, a prefix that runs the next word, or an assignment before the command
        elif word in PREFIXES_WITH_OPTIONS:
            found.append((word, line_of(i - 1)))
            while i < len(tokens) and tokens[i][0] == "word" and tokens[i][1].startswith("-"):
                i += 1
            if word == "timeout":
                i += 1  # its duration
        elif i + 1 < len(tokens) and tokens[i] == ("op", "(") and tokens[i + 1] == ("op", ")"):
            i += 2  # a function's definition
        else:
            found.append((word, line_of(i - 1)))
            at_start = False
            if word == "find":
                # `find ... -exec CMD`: CMD runs too.
                j = i
                while j + 1 < len(tokens) and tokens[j][0] == "word":
                    if tokens[j][1] in ("-exec", "-execdir"):
                        found.append((unquote(tokens[j + 1][1]), line_of(i - 1)))
                    j += 1
    return found


def functions(text):
    """The functions defined in shell `text` (at column 0, closed by `}` at column
    0), and the text outside them."""
    found, outside, current, body = {}, [], None, []
    for line in text.split("\n"):
        start = re.match(r"^([A-Za-z_][\w-]*)\(\)\s*\{\s*$", line)
        one_line = re.match(r"^([A-Za-z_][\w-]*)\(\)\s*\{(.*)\}\s*$", line)
        if current is None and one_line:
            found[one_line.group(1)] = one_line.group(2)
        elif current is None and start:
            current, body = start.group(1), []
        elif current is not None and line == "}":
            found[current] = "\n".join(body)
            current = None
        elif current is not None:
            body.append(line)
        else:
            outside.append(line)
    if current is not None:
        raise SystemExit(f"check-tools: function {current} has no closing brace at column 0")
    return found, "\n".join(outside)


def checked(body):
    """The commands that `body` checks for with `have NAME` or `command -v NAME`."""
    return set(re.findall(r"(?:\bhave|command -v)\s+([\w.+-]+)", body))


def test_programs(root):
    """The programs the Rust tests and test helpers start, as groups of
    alternatives: {(names...): where}."""
    programs = {}
    for path in sorted(root.glob("crates/*/src/**/*.rs")) + sorted(root.glob("crates/*/tests/**/*.rs")) + sorted(
        root.glob("tests/**/*.rs")
    ):
        text = path.read_text()
        where = str(path.relative_to(root))
        for name in re.findall(r'Command::new\("([^"]+)"\)', text):
            programs.setdefault((name,), where)
        # An environment variable naming the program, else its default name.
        for name in re.findall(r'=>\s*\("[A-Z][A-Z0-9_]+",\s*"([a-z][a-z0-9-]*)"\)', text):
            programs.setdefault((name,), where)
        for name in re.findall(r'var(?:_os)?\("[A-Z][A-Z0-9_]+"\)\s*\.unwrap_or_else\(\|_\|\s*"([a-z][a-z0-9-]*)"', text):
            programs.setdefault((name,), where)
        # Alternatives looked up on PATH: `[names...] ... split_paths`.
        for names in re.findall(r"\[((?:\s*\"[a-z][a-z0-9-]*\",?)+)\s*\][^;]{0,200}split_paths", text, re.S):
            programs.setdefault(tuple(re.findall(r'"([^"]+)"', names)), where)
    config = root / ".cargo/config.toml"
    if config.exists():
        for name in re.findall(r'^runner\s*=\s*"([^"\s]+)', config.read_text(), re.M):
            programs.setdefault((name,), ".cargo/config.toml")
    return programs


def base_commands(root):
    listed = set()
    for line in (root / "scripts/base-commands.txt").read_text().splitlines():
        line = line.split("#", 1)[0]
        listed.update(line.split())
    return listed


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent)
    parser.add_argument("--list", action="store_true", help="print each command and where it comes from")
    parser.add_argument("--self-test", action="store_true", help="check the guard itself on small made-up trees")
    args = parser.parse_args()
    if args.self_test:
        return self_test()
    return check(args.root, args.list)


def check(root, list_sources=False):
    base = base_commands(root)
    errors, sources = [], {}

    for name in sorted(base):
        if not shutil.which(name):
            errors.append(
                f"scripts/base-commands.txt lists `{name}` as on every fresh machine, but this one "
                f"has none: install it in the set-up step that first needs it, then drop it from the list"
            )

    scripts = sorted((root / "scripts").glob("*.sh")) + [root / ".ci/run"]
    defined, bodies = {}, []
    for script in scripts:
        funcs, outside = functions(script.read_text())
        rel = str(script.relative_to(root))
        for name, body in funcs.items():
            defined[name] = body
            bodies.append((f"{rel}: {name}()", name, body))
        bodies.append((rel, None, outside))

    installs = {}  # command -> functions that install it
    for name, body in defined.items():
        if INSTALLERS.search(body):
            for command in checked(body):
                installs.setdefault(command, set()).add(name)

    programs = test_programs(root)

    for where, own, body in bodies:
        provided, guarded = set(), set()
        if own and own in defined and INSTALLERS.search(body):
            provided |= checked(body)
        seen_lines = []
        for command, line in commands(body):
            seen_lines.append(line)
            if command in defined:
                for name, installers in installs.items():
                    if command in installers:
                        provided.add(name)
                continue
            # What runs the tests: cargo test, without --no-run.
            if command == "cargo" and re.search(r"\bcargo test\b", line) and "--no-run" not in line:
                for group, origin in programs.items():
                    if not any(name in base or name in provided for name in group):
                        errors.append(
                            f"{where}: `cargo test` runs tests that start `{' or '.join(group)}` ({origin}), "
                            f"which is not on the base machine and not installed before it"
                            + _how(group, installs)
                        )
                    sources.setdefault(group[0], _origin(group, base, installs))
            if command in BUILTINS or command in KEYWORDS or command.startswith(("$", "/", ".", "~")):
                continue
            if not re.fullmatch(r"[\w.+-]+", command):
                continue
            sources.setdefault(command, _origin((command,), base, installs))
            if command in base or command in provided:
                continue
            if re.search(rf"(\bhave|command -v)\s+{re.escape(command)}\b", line) or command in guarded:
                guarded.add(command)
                continue
            errors.append(
                f"{where}: calls `{command}` (in `{line.strip()}`), which is not on the base machine "
                f"(scripts/base-commands.txt) and not installed before it in this function"
                + _how((command,), installs)
            )

    if list_sources:
        for command in sorted(sources):
            print(f"{command}: {sources[command]}")
    if errors:
        for error in dict.fromkeys(errors):
            print(f"error: {error}", file=sys.stderr)
        return 1
    print(
        f"check-tools: {len(sources)} external commands and test programs, each on the base machine "
        f"or installed by the scripts before its first use"
    )
    return 0


def _how(group, installs):
    fixes = sorted({f for name in group for f in installs.get(name, ())})
    return f": call {' or '.join(fixes)} first" if fixes else ": add a set-up step that installs it"


def _origin(group, base, installs):
    for name in group:
        if name in base:
            return "base machine"
        if name in installs:
            return "installed by " + ", ".join(sorted(installs[name]))
    return "nowhere"


# Made-up trees and whether the guard must pass them: what it is for (a tool used
# before it is installed, or never installed) and what it must let through.
SELF_TESTS = [
    ("a tool installed by the function that uses it", True, """
ensure_zstd() {
    have zstd && return
    apt_install zstd
}
pack() {
    ensure_zstd
    zstd -q "$1" 2>&1 | tee -a log
}
"""),
    ("a tool whose install another path runs first (the brotli bug)", False, """
ensure_zstd() {
    have zstd && return
    apt_install zstd
}
pack() {
    zstd -q "$1"
}
"""),
    ("a tool that nothing installs", False, """
pack() { zstd -q "$1"; }
"""),
    ("a use guarded by a look-up, quoting, a case, arrays and redirections", True, """
pack() {
    local flags=(-q --rm) x
    if command -v zstd >/dev/null; then zstd "${flags[@]}" "$1" 2>&1; fi
    case "$1" in
        *.txt | *"a b"*) echo "zstd; lz4 $(date)" ;;
        *) exec {fd}>&- ;;
    esac
    ((x > 1)) || [[ "$x" == *";"* ]] || true
}
"""),
    ("a tool inside a command substitution", False, """
pack() { echo "$(zstd --version)"; }
"""),
    ("a tool a test starts, installed before cargo test", True, """
ensure_zstd() {
    have zstd && return
    apt_install zstd
}
ensure_zstd
cargo test --workspace
""", 'fn t() { std::process::Command::new("zstd").status().unwrap(); }'),
    ("a tool a test starts, never installed", False, """
cargo test --workspace
""", 'fn t() { std::process::Command::new("zstd").status().unwrap(); }'),
]


def self_test():
    import contextlib
    import io
    import tempfile

    failed = 0
    for what, passes, script, *rust in SELF_TESTS:
        with tempfile.TemporaryDirectory() as tree:
            root = Path(tree)
            (root / "scripts").mkdir()
            (root / ".ci").mkdir()
            (root / "scripts/lib.sh").write_text(
                "have() { command -v \"$1\" >/dev/null 2>&1; }\n"
                "apt_install() {\n    apt-get install -y \"$@\"\n}\n" + script
            )
            (root / ".ci/run").write_text("exec scripts/lib.sh\n")
            (root / "scripts/base-commands.txt").write_text("apt-get cargo date tee true\n")
            if rust:
                (root / "crates/x/tests").mkdir(parents=True)
                (root / "crates/x/tests/t.rs").write_text(rust[0])
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                passed = check(root) == 0
        if passed != passes:
            failed += 1
            print(f"check-tools self-test: {what}: the guard {'failed' if passes else 'passed'} it", file=sys.stderr)
    if failed:
        return 1
    print(f"check-tools self-test: {len(SELF_TESTS)} made-up trees judged right")
    return 0


if __name__ == "__main__":
    sys.exit(main())
