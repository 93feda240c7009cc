"""The agents' tools and the parser of the action line they write.

    tools = make_tools(world)                 # {"wiki": ..., "calc": ...}
    outcome = execute("wiki[Velora Nights]", tools)
    outcome.observation                       # the paragraph, or "Error: ..." text
    execute("finish[1942]", tools).answer     # "1942"

Everything here reads model output, i.e. hostile text: inputs are cut to a fixed length
before any work, the calculator's parser is hand-written (never eval) with bounded depth and
operand size, and nothing raises on bad input; a bad call becomes an error observation the
agent can read.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

MAX_ACTION_CHARS = 256  # longest action line looked at; the rest is ignored
MAX_ARG_CHARS = 120  # longest tool argument
MAX_CALC_DEPTH = 16  # parentheses / unary minus nesting
MAX_CALC_DIGITS = 40  # longest operand and result
MAX_OBSERVATION_CHARS = 1200
ACTION_NAMES = ("wiki", "calc", "finish")


def _quote(text: str, n: int = 40) -> str:
    """A short printable excerpt of untrusted text for an error message."""
    text = "".join(ch if ch.isprintable() else "?" for ch in text[: n + 1])
    return repr(text[:n] + ("..." if len(text) > n else ""))


# ---- calc -------------------------------------------------------------------------------------
class CalcError(ValueError):
    pass


class _CalcParser:
    """expr := term (('+'|'-') term)* ; term := unary (('*'|'/') unary)* ;
    unary := '-' unary | '(' expr ')' | integer. Exact integer arithmetic; '/' must divide exactly."""

    def __init__(self, text: str):
        self.s = text
        self.i = 0

    def _skip(self):
        while self.i < len(self.s) and self.s[self.i] == " ":
            self.i += 1

    def _peek(self) -> str:
        self._skip()
        return self.s[self.i] if self.i < len(self.s) else ""

    def parse(self) -> int:
        value = self._expr(0)
        if self._peek():
            raise CalcError(f"unexpected {self._peek()!r} at position {self.i}")
        return value

    def _expr(self, depth: int) -> int:
        value = self._term(depth)
        while self._peek() in ("+", "-"):
            op = self.s[self.i]
            self.i += 1
            rhs = self._term(depth)
            value = value + rhs if op == "+" else value - rhs
            _check_size(value)
        return value

    def _term(self, depth: int) -> int:
        value = self._unary(depth)
        while self._peek() in ("*", "/"):
            op = self.s[self.i]
            self.i += 1
            rhs = self._unary(depth)
            if op == "*":
                value *= rhs
            else:
                if rhs == 0:
                    raise CalcError("division by zero")
                if value % rhs:
                    raise CalcError(f"{value} / {rhs} is not a whole number")
                value //= rhs
            _check_size(value)
        return value

    def _unary(self, depth: int) -> int:
        if depth >= MAX_CALC_DEPTH:
            raise CalcError(f"nested more than {MAX_CALC_DEPTH} deep")
        ch = self._peek()
        if ch == "-":
            self.i += 1
            return -self._unary(depth + 1)
        if ch == "(":
            self.i += 1
            value = self._expr(depth + 1)
            if self._peek() != ")":
                raise CalcError(f"missing ')' at position {self.i}")
            self.i += 1
            return value
        start = self.i
        while self.i < len(self.s) and "0" <= self.s[self.i] <= "9":  # ASCII digits only
            self.i += 1
        if self.i == start:
            raise CalcError(f"expected a number at position {self.i}" + (f", got {ch!r}" if ch else ""))
        if self.i - start > MAX_CALC_DIGITS:
            raise CalcError(f"number longer than {MAX_CALC_DIGITS} digits")
        return int(self.s[start:self.i])


def _check_size(value: int) -> None:
    if abs(value) >= 10 ** MAX_CALC_DIGITS:
        raise CalcError(f"result longer than {MAX_CALC_DIGITS} digits")


def calc_value(expression: str) -> int:
    """The integer value of `expression` (+ - * / and parentheses); CalcError on anything else."""
    if not isinstance(expression, str):
        raise CalcError(f"expected text, got {type(expression).__name__}")
    if len(expression) > MAX_ARG_CHARS:
        raise CalcError(f"expression longer than {MAX_ARG_CHARS} characters")
    if not expression.strip():
        raise CalcError("empty expression")
    return _CalcParser(expression).parse()


def calc(expression: str) -> str:
    """The calc tool: the result as text, or 'Error: ...' (never raises)."""
    try:
        return str(calc_value(expression))
    except CalcError as e:
        return f"Error: calc cannot evaluate {_quote(expression)}: {e}."


# ---- wiki -------------------------------------------------------------------------------------
def _normalize_name(text: str) -> str:
    return " ".join(text.split()).lower()


class Wiki:
    """wiki[entity]: the entity's paragraph (exact name, case and spacing ignored)."""

    def __init__(self, world):
        self.world = world
        self._index = {_normalize_name(n): n for n in world.entities}

    def __call__(self, query: str) -> str:
        if isinstance(query, str) and len(query) > MAX_ARG_CHARS:
            return f"Error: wiki name longer than {MAX_ARG_CHARS} characters."
        if not isinstance(query, str) or not query.strip():
            return "Error: wiki needs an entity name, as in wiki[Name]."
        name = self._index.get(_normalize_name(query))
        if name is None:
            return f"Error: no wiki entry for {_quote(query)}."
        return self.world.paragraph(name)[:MAX_OBSERVATION_CHARS]


def make_tools(world) -> dict:
    """The task's tools, name -> callable(str) -> str."""
    return {"wiki": Wiki(world), "calc": calc}


# ---- the action line --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Action:
    name: str  # "wiki" | "calc" | "finish" | any tool name
    arg: str


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What one action line led to: an observation to append, or a final answer."""

    observation: str  # tool output or "Error: ..." ("" for finish)
    action: Action | None  # None when the line did not parse
    answer: str | None = None  # finish[...]'s argument
    ok: bool = True  # False: parse error or the tool reported an error

    @property
    def finished(self) -> bool:
        return self.answer is not None


def parse_action(line, names=ACTION_NAMES) -> Action | str:
    """`name[arg]` (optionally after "Action:") -> Action; anything else -> an error message (str).

    Only the first MAX_ACTION_CHARS characters are read and only the first line; the argument
    may not contain brackets. Never raises.
    """
    if not isinstance(line, str):
        return f"Error: expected an action line, got {type(line).__name__}."
    text = line[:MAX_ACTION_CHARS]
    nl = text.find("\n")
    if nl >= 0:
        text = text[:nl]
    text = text.strip()
    if text.startswith("Action:"):
        text = text[len("Action:"):].strip()
    if not text:
        return "Error: empty action; write one of " + ", ".join(f"{n}[...]" for n in names) + "."
    open_at = text.find("[")
    close_at = text.rfind("]")
    if open_at <= 0 or close_at < open_at or text[close_at + 1:].strip():
        return f"Error: cannot parse action {_quote(text)}; write name[argument]."
    name = text[:open_at].strip()
    if name not in names:
        return f"Error: unknown action {_quote(name)}; use one of {', '.join(names)}."
    arg = text[open_at + 1 : close_at].strip()
    if "[" in arg or "]" in arg:
        return f"Error: cannot parse action {_quote(text)}; the argument may not contain brackets."
    if len(arg) > MAX_ARG_CHARS:
        return f"Error: argument of {name} longer than {MAX_ARG_CHARS} characters."
    return Action(name, arg)


def execute(line, tools: Mapping[str, Callable[[str], str]]) -> Outcome:
    """Parse one action line and run it: a tool's observation, finish's answer, or an error
    observation. Never raises (a tool that raises becomes an error observation too)."""
    parsed = parse_action(line, tuple(tools) + ("finish",))
    if isinstance(parsed, str):
        return Outcome(observation=parsed, action=None, ok=False)
    if parsed.name == "finish":
        return Outcome(observation="", action=parsed, answer=parsed.arg)
    try:
        obs = tools[parsed.name](parsed.arg)
    except Exception as e:  # a user tool's bug must not end the episode
        obs = f"Error: {parsed.name} failed: {type(e).__name__}: {_quote(str(e), 80)}."
    obs = " ".join(str(obs)[: 2 * MAX_OBSERVATION_CHARS].split())[:MAX_OBSERVATION_CHARS]  # one line: the format is line-based
    return Outcome(observation=obs, action=parsed, ok=not obs.startswith("Error:"))
