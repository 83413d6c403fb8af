"""What the benchmarks that run named cells share: their "key=value" options, and XLA's memory plan
of a compiled program."""

from __future__ import annotations


def parse_options(text: str, options: list[str], keys: dict, flag: str) -> dict:
    """The "key=value" `options` of cell `text` (a --`flag` value) -> {key: keys[key](value)}; an
    unknown key exits naming the flag, the cell and the keys known."""
    parsed = {}
    for option in options:
        key, _, value = option.partition("=")
        if key not in keys:
            raise SystemExit(f"{flag}: unknown key {key!r} in {text!r}, expected one of {sorted(keys)}")
        parsed[key] = keys[key](value)
    return parsed


def planned_bytes(memory) -> int:
    """Device bytes a compiled program holds at once by XLA's plan (`compiled.memory_analysis()`):
    arguments + outputs + temporaries, less what outputs alias (donated arguments)."""
    return int(memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
               - memory.alias_size_in_bytes)
