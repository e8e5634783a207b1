"""``sparse24`` / ``python -m sparse24``: the command line.

    sparse24 eval [...]   perplexity of a real LM, dense vs N:M attention (sparse24.eval)
    sparse24 demo [...]   the kernel on a small mixed batch vs dense and the float64 reference
    sparse24 plan [...]   which layers to sparsify under a perplexity budget (sparse24.plan)
    sparse24 passkey [...] long-context retrieval (passkey), dense vs N:M attention (sparse24.passkey)
"""

from __future__ import annotations

import inspect
import sys

_COMMANDS = {
    "eval": ("sparse24.eval", "perplexity of a real LM (SmolLM2-135M by default), dense vs N:M sparse attention"),
    "demo": ("sparse24.demo", "the N:M kernel on a small mixed batch vs dense and the float64 reference"),
    "plan": ("sparse24.plan", "which layers to sparsify under a perplexity budget (writes a JSON plan)"),
    "passkey": ("sparse24.passkey", "long-context retrieval (a key hidden in filler text), dense vs N:M sparse"),
}


def _usage() -> str:
    lines = ["usage: sparse24 {eval,demo,plan,passkey} [options]   (python -m sparse24 ...)", "", "commands:"]
    lines += [f"  {name:<7} {help_}" for name, (_, help_) in _COMMANDS.items()]
    lines += ["", "`sparse24 COMMAND --help` lists a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in _COMMANDS:
        print(f"sparse24: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    if command == "eval":
        from sparse24.eval import main as run
    elif command == "plan":
        from sparse24.plan import main as run
    elif command == "passkey":
        from sparse24.passkey import main as run
    else:
        from sparse24.demo import main as run
    if "prog" in inspect.signature(run).parameters:
        return run(rest, prog=f"sparse24 {command}") or 0
    return run(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
