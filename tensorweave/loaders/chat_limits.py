"""Chat templates under limits: jinja2's immutable sandbox, plus bounds on time, output size and number sizes.

A chat template ships with a checkpoint, so it is untrusted code. jinja2's ``ImmutableSandboxedEnvironment``
already refuses attribute escapes and mutation; what it does not bound is work. ``LimitedSandbox`` adds:

- time: every call (functions, macros, methods), filter, intercepted operator, ``range`` step and output chunk checks
  a per-render deadline (``TIME_LIMIT_S``), so nested ``range(100000)`` loops or a recursive macro fan-out stop;
- output and sizes: the rendered text, and any string a call, filter or ``*``/``+``/``%`` makes, stays under
  ``max(MIN_OUTPUT_CHARS, OUTPUT_PER_INPUT x the conversation's size)``; integer arguments that would size a
  string (``center(10**9)``, ``"x" * 10**9``, a ``%`` or ``format`` width of 7+ digits) are refused before the
  string is built; ``a ** b`` on integers is refused past ``MAX_POWER_BITS`` bits;
- loop range: ``range`` holds at most jinja2's ``MAX_RANGE`` (100000) items, and ticks the deadline as it goes.

Any failure while rendering (a limit, a sandbox refusal, an undefined variable, a Python error inside the template)
becomes one ``TemplateError`` line naming the template's source; ``raise_exception()`` (the template refusing a
conversation) stays ``UnsupportedError``.
"""

from __future__ import annotations

import functools
import json
import math
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jinja2
import jinja2.sandbox

from ..errors import TemplateError, TensorweaveError

TIME_LIMIT_S = 5.0  # a real template renders in milliseconds
MIN_OUTPUT_CHARS = 16 << 20
OUTPUT_PER_INPUT = 4  # the prompt may be this many times the conversation's JSON (markup around each message)
MAX_POWER_BITS = 1 << 16
SIZING_FILTERS = frozenset({"center", "indent", "wordwrap", "truncate", "format", "batch", "slice"})
WIDE_FORMAT = re.compile(r"(?:%[-+ #0]*(?:\*|\d{7,}))|(?:\{[^{}]*?\d{7,}[^{}]*\})")  # % and {} widths of 7+ digits


# what a template's own failures raise: jinja2's (undefined, sandbox refusals) and Python's from inside the template
RENDER_ERRORS = (jinja2.TemplateError, ArithmeticError, LookupError, TypeError, ValueError, RecursionError, MemoryError)


class _Limit(Exception):
    """A template went past a limit (internal: ``render`` turns it into a TemplateError)."""


class _Budget(threading.local):
    deadline = math.inf
    max_chars = MIN_OUTPUT_CHARS


class _Range:
    """``range`` for templates: at most MAX_RANGE items, ticking the render deadline as it is iterated."""

    def __init__(self, env: LimitedSandbox, r: range) -> None:
        self._env, self._r = env, r

    def __iter__(self) -> Iterator[int]:
        for i, v in enumerate(self._r):
            if not i & 1023:
                self._env.tick()
            yield v

    def __reversed__(self) -> Iterator[int]:
        return iter(_Range(self._env, self._r[::-1]))

    def __len__(self) -> int:
        return len(self._r)

    def __getitem__(self, i: Any) -> Any:
        return self._r[i]

    def __contains__(self, v: object) -> bool:
        return v in self._r


class LimitedSandbox(jinja2.sandbox.ImmutableSandboxedEnvironment):
    """jinja2's immutable sandbox with the limits of the module docstring (set per render by ``render``)."""

    intercepted_binops = frozenset({"*", "**", "%", "+"})

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.budget = _Budget()
        self.globals["range"] = self._range
        self.filters = {name: self._limited(name, f) for name, f in self.filters.items()}

    def tick(self) -> None:
        if time.monotonic() > self.budget.deadline:
            raise _Limit(f"it ran longer than {TIME_LIMIT_S:g} s")

    def _sized(self, n: int, what: str) -> None:
        if n > self.budget.max_chars:
            raise _Limit(f"{what} ({n}) exceeds the output limit of {self.budget.max_chars} characters")

    def _check_args(self, args: Any, kwargs: Mapping[str, Any]) -> None:
        for a in (*args, *kwargs.values()):
            if isinstance(a, int) and not isinstance(a, bool):
                self._sized(abs(a), "a size argument")

    def _range(self, *args: Any) -> _Range:
        r = range(*args)
        if len(r) > jinja2.sandbox.MAX_RANGE:
            raise _Limit(f"range of {len(r)} items exceeds the loop limit of {jinja2.sandbox.MAX_RANGE}")
        return _Range(self, r)

    def _limited(self, name: str, f: Callable[..., Any]) -> Callable[..., Any]:
        sizing = name in SIZING_FILTERS

        @functools.wraps(f)  # keeps jinja2's pass_context/pass_environment marks
        def filter_(*args: Any, **kwargs: Any) -> Any:
            self.tick()
            if sizing:
                self._check_args(args, kwargs)
                if any(isinstance(a, str) and WIDE_FORMAT.search(a) for a in args):
                    raise _Limit(f"a {name} with a field width of millions")
            out = f(*args, **kwargs)
            if isinstance(out, str):
                self._sized(len(out), "a filter's result")
            return out

        return filter_

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        self.tick()
        ints = all(isinstance(v, int) and not isinstance(v, bool) for v in (left, right))
        if operator == "**" and ints and right > 0 and abs(left).bit_length() * right > MAX_POWER_BITS:
            raise _Limit(f"{left} ** {right} exceeds {MAX_POWER_BITS} bits")
        if operator == "*" and not ints:
            seq, n = (left, right) if isinstance(right, int) else (right, left)
            if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
                self._sized(len(seq) * n, "a repetition")
        if operator == "%" and isinstance(left, str) and WIDE_FORMAT.search(left):
            raise _Limit("a % format with a field width of millions")
        if operator == "+" and isinstance(left, (str, list)) and isinstance(right, type(left)):
            self._sized(len(left) + len(right), "a concatenation")
        return super().call_binop(context, operator, left, right)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        __self.tick()
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, (str, list, tuple)):  # str.center(10**9), str.zfill, "{:>9999999}".format ...
            __self._check_args(args, kwargs)
            if isinstance(owner, str) and WIDE_FORMAT.search(owner):
                raise _Limit("a format with a field width of millions")
        out = super().call(__context, __obj, *args, **kwargs)
        if isinstance(out, str):
            __self._sized(len(out), "a call's result")
        return out


def render(template: jinja2.Template, variables: Mapping[str, Any], source: str) -> str:
    """``template`` rendered with ``variables`` under the limits; one ``TemplateError`` naming ``source`` if not."""
    env = template.environment
    assert isinstance(env, LimitedSandbox), "chat templates are compiled by a LimitedSandbox"
    budget = env.budget
    size = len(json.dumps(variables.get("messages"), default=str, ensure_ascii=False))
    budget.deadline = time.monotonic() + TIME_LIMIT_S
    budget.max_chars = max(MIN_OUTPUT_CHARS, OUTPUT_PER_INPUT * size)
    pieces: list[str] = []
    total = 0
    try:
        for piece in template.generate(**variables):
            total += len(piece)
            env._sized(total, "the rendered prompt")
            env.tick()
            pieces.append(piece)
    except TensorweaveError:  # raise_exception(): the template's own refusal, already one line
        raise
    except _Limit as e:
        raise TemplateError(f"{source}: the chat template stopped: {e}") from None
    except (
        jinja2.TemplateError,
        ArithmeticError,
        LookupError,
        TypeError,
        ValueError,
        RecursionError,
        MemoryError,
    ) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise TemplateError(f"{source}: the chat template failed: {type(e).__name__}: {first}") from None
    finally:
        budget.deadline = math.inf
    return "".join(pieces)
