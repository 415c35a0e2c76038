"""Shell completion scripts for aish (bash, zsh, fish): subcommands, options, specialist names.

Names are written into the script when it is generated (from the roster file), so pressing Tab costs
no Python start-up and no trip to the bus.
"""

from __future__ import annotations

import tomllib
from importlib import resources
from pathlib import Path

SHELLS = ("bash", "zsh", "fish")
# Every `aish SUBCOMMAND` (aish_client/subcommands.py dispatches these).
SUBCOMMANDS = ("list", "bulk", "sessions", "logs", "completion", "usage", "runs", "attach", "cancel", "route")
SESSION_OPS = ("list", "show", "rm", "fork", "rename")
OPTIONS = (
    "-c",
    "-m",
    "--model",
    "--system",
    "-o",
    "--option",
    "-f",
    "--attach",
    "--json",
    "--no-log",
    "--session",
    "--continue",
    "--detach",
    "--capability",
    "--max-tokens",
    "--temperature",
    "--timeout",
    "--idle-timeout",
    "--layout",
    "--nats",
    "--creds",
    "--tls-ca",
    "--log-level",
    "--version",
    "-h",
    "--help",
)
OPTION_KEYS = ("max_tokens=", "temperature=", "top_p=", "repeat_penalty=", "seed=")
# Options whose value is free text: nothing to complete.
VALUE_OPTIONS = (
    "-m|--model|--system|--session|--capability|--max-tokens|--temperature|--timeout|--idle-timeout|"
    "--nats|--log-level"
)


def roster_names(roster: Path | None = None) -> list[str]:
    """The specialists of ``roster`` or the packaged roster (read as data: aish imports no specialist
    code)."""
    try:
        text = roster.read_text() if roster else (resources.files("deploy") / "roster.toml").read_text()
        data = tomllib.loads(text)
    except (OSError, ModuleNotFoundError, tomllib.TOMLDecodeError):
        return []
    return sorted(data.get("specialists", {}))


def script(shell: str) -> str:
    names = " ".join(roster_names())
    subs = " ".join(SUBCOMMANDS)
    opts = " ".join(OPTIONS)
    keys = " ".join(OPTION_KEYS)
    ops = " ".join(SESSION_OPS)
    if shell == "bash":
        return f"""# aish completion for bash: eval "$(aish completion bash)"
_aish() {{
    local cur prev
    cur="${{COMP_WORDS[COMP_CWORD]}}"
    prev="${{COMP_WORDS[COMP_CWORD-1]}}"
    case "$prev" in
        -f|--attach|bulk) COMPREPLY=( $(compgen -f -- "$cur") ); return ;;
        -o|--option) COMPREPLY=( $(compgen -W "{keys}" -- "$cur") ); compopt -o nospace 2>/dev/null; return ;;
        sessions) COMPREPLY=( $(compgen -W "{ops}" -- "$cur") ); return ;;
        completion) COMPREPLY=( $(compgen -W "{" ".join(SHELLS)}" -- "$cur") ); return ;;
        --layout) COMPREPLY=( $(compgen -W "stacked lines" -- "$cur") ); return ;;
        {VALUE_OPTIONS}) return ;;
    esac
    if [[ "$cur" == -* ]]; then
        COMPREPLY=( $(compgen -W "{opts}" -- "$cur") )
    else
        COMPREPLY=( $(compgen -W "{subs} {names}" -- "$cur") )
    fi
}}
complete -o default -F _aish aish
"""
    if shell == "zsh":
        return f"""#compdef aish
# aish completion for zsh: eval "$(aish completion zsh)"
_aish() {{
    local -a subs names opts
    subs=({subs})
    names=({names})
    opts=({opts})
    case "${{words[CURRENT-1]}}" in
        -f|--attach|bulk) _files; return ;;
        -o|--option) compadd -S '' -- {keys}; return ;;
        sessions) compadd -- {ops}; return ;;
        completion) compadd -- {" ".join(SHELLS)}; return ;;
        --layout) compadd -- stacked lines; return ;;
        {VALUE_OPTIONS}) return ;;
    esac
    if [[ "$PREFIX" == -* ]]; then
        compadd -- $opts
    else
        compadd -- $subs $names
    fi
}}
if (( $+functions[compdef] )); then compdef _aish aish; fi
"""
    lines = [
        "# aish completion for fish: aish completion fish | source",
        "complete -c aish -f",
        f'complete -c aish -n "__fish_use_subcommand" -a "{subs}"',
        f'complete -c aish -n "__fish_use_subcommand" -a "{names}" -d specialist',
        f'complete -c aish -n "__fish_seen_subcommand_from sessions" -a "{ops}"',
        f'complete -c aish -n "__fish_seen_subcommand_from completion" -a "{" ".join(SHELLS)}"',
        'complete -c aish -n "__fish_seen_subcommand_from bulk" -F',
        "complete -c aish -s m -l model -r -d 'model, PROVIDER:MODEL'",
        "complete -c aish -l system -r -d 'system prompt'",
        f"complete -c aish -s o -l option -r -a '{keys}' -d 'request option key=value'",
        "complete -c aish -s f -l attach -r -F -d 'attach a file'",
        "complete -c aish -l json -d 'JSON events'",
        "complete -c aish -l no-log -d 'do not log'",
        "complete -c aish -s c -d 'run a pipeline'",
        "complete -c aish -l session -r -d session",
        "complete -c aish -l continue -d 'the last session'",
        "complete -c aish -l capability -r",
        "complete -c aish -l max-tokens -r",
        "complete -c aish -l temperature -r",
        "complete -c aish -l timeout -r",
        "complete -c aish -l idle-timeout -r",
        "complete -c aish -l layout -r -a 'stacked lines'",
        "complete -c aish -l nats -r",
        "complete -c aish -l version",
    ]
    return "\n".join(lines) + "\n"
