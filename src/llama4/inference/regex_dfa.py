"""ECMA-262 regular expressions (the subset JSON Schema's ``pattern`` uses) compiled to a DFA over code points.

Used by :mod:`llama4.inference.constrained` for ``pattern`` and ``format``. The DFA runs over Unicode
scalar values (code points without the UTF-16 surrogates, which a JSON string cannot hold); the
constraint feeds it the characters of a JSON string as their UTF-8 bytes or escapes complete.

Semantics (JSON Schema: "regular expressions are not implicitly anchored"): :func:`compile_search`
builds the language of the strings that *contain* a match, so ``"a+"`` accepts ``"xay"``; ``^`` and
``$`` anchor at the start and end of the whole string (there is no multiline flag). ``.`` is any
character but a line terminator (``\\n``, ``\\r``, U+2028, U+2029); ``\\d``, ``\\w`` are ASCII, ``\\s``
is ECMA-262's white space and line terminators, as with the ``u`` flag JSON Schema recommends.

Syntax: alternation, groups (capturing, ``(?:...)``, ``(?<name>...)``), the quantifiers ``* + ?
{n} {n,} {n,m}`` (lazy forms too: they match the same strings), classes with ranges and negation,
the escapes ``\\d \\D \\w \\W \\s \\S \\t \\n \\r \\f \\v \\0 \\cX \\xHH \\uHHHH \\u{H...}`` (a
``\\uHHHH\\uHHHH`` surrogate pair is one character) and escaped punctuation. Lookaround,
backreferences, ``\\b``/``\\B`` and ``\\p{...}`` raise :class:`RegexError`, as do patterns whose
automaton would be too large.
"""

from __future__ import annotations

import bisect
import functools
from collections.abc import Iterable, Sequence

MAX_CP = 0x10FFFF
MAX_REPEAT = 1000  # the largest n or m in {n,m}
MAX_NFA_STATES = 50_000
MAX_DFA_STATES = 5_000
MAX_LENGTH_LAYERS = 20_000

Ranges = tuple  # of (lo, hi) inclusive code-point ranges, sorted, disjoint, without surrogates


class RegexError(ValueError):
    """The pattern is not a regular expression of the supported subset (the message says why)."""


def normalize(ranges: Iterable[tuple[int, int]]) -> Ranges:
    """Sorted, merged ranges with the surrogates U+D800..U+DFFF removed."""
    merged: list[list[int]] = []
    for lo, hi in sorted(ranges):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    out = []
    for lo, hi in merged:
        if hi < 0xD800 or lo > 0xDFFF:
            out.append((lo, hi))
            continue
        if lo < 0xD800:
            out.append((lo, 0xD7FF))
        if hi > 0xDFFF:
            out.append((0xE000, hi))
    return tuple(out)


def negate(ranges: Ranges) -> Ranges:
    out, nxt = [], 0
    for lo, hi in ranges:
        if lo > nxt:
            out.append((nxt, lo - 1))
        nxt = hi + 1
    if nxt <= MAX_CP:
        out.append((nxt, MAX_CP))
    return normalize(out)


ANY = normalize([(0, MAX_CP)])
DIGIT = ((0x30, 0x39),)
WORD = ((0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A))
SPACE = normalize([(0x09, 0x0D), (0x20, 0x20), (0xA0, 0xA0), (0x1680, 0x1680), (0x2000, 0x200A),
                   (0x2028, 0x2029), (0x202F, 0x202F), (0x205F, 0x205F), (0x3000, 0x3000), (0xFEFF, 0xFEFF)])
DOT = negate(normalize([(0x0A, 0x0A), (0x0D, 0x0D), (0x2028, 0x2029)]))
_CLASS_ESCAPES = {"d": DIGIT, "D": negate(DIGIT), "w": WORD, "W": negate(WORD), "s": SPACE, "S": negate(SPACE)}
_CONTROL_ESCAPES = {"f": 0x0C, "n": 0x0A, "r": 0x0D, "t": 0x09, "v": 0x0B}
_HEXDIGITS = frozenset("0123456789abcdefABCDEF")

# ---------------------------------------------------------------------------------------------------
# Parser: pattern -> tree of ("set", ranges), ("cat", [..]), ("alt", [..]), ("rep", node, lo, hi|None),
# ("bol",), ("eol",).


class _Parser:
    def __init__(self, src: str) -> None:
        self.s = src
        self.i = 0

    def error(self, what: str) -> RegexError:
        return RegexError(f"{what} at position {self.i} of /{self.s}/")

    def peek(self, k: int = 0) -> str | None:
        j = self.i + k
        return self.s[j] if j < len(self.s) else None

    def parse(self) -> tuple:
        node = self.disjunction()
        if self.i < len(self.s):
            raise self.error("unbalanced ')'")
        return node

    def disjunction(self) -> tuple:
        alts = [self.alternative()]
        while self.peek() == "|":
            self.i += 1
            alts.append(self.alternative())
        return alts[0] if len(alts) == 1 else ("alt", alts)

    def alternative(self) -> tuple:
        items = []
        while self.peek() is not None and self.peek() not in "|)":
            items.append(self.term())
        return ("cat", items)

    def term(self) -> tuple:
        c = self.s[self.i]
        anchor = False
        if c in "^$":
            self.i += 1
            atom, anchor = ("bol",) if c == "^" else ("eol",), True
        elif c == "(":
            atom = self.group()
        elif c == ".":
            self.i += 1
            atom = ("set", DOT)
        elif c == "[":
            atom = ("set", self.char_class())
        elif c == "\\":
            atom = self.atom_escape()
        elif c in "*+?" or (c == "{" and self.quantifier_ahead()):
            raise self.error("nothing to repeat")
        else:  # '{', '}' and ']' that do not form syntax are literal (ECMA-262 Annex B)
            self.i += 1
            atom = ("set", normalize([(ord(c), ord(c))]))
        q = self.quantifier()
        if q is None:
            return atom
        if anchor:
            raise self.error("a quantifier after an anchor")
        return ("rep", atom, q[0], q[1])

    def quantifier_ahead(self) -> bool:
        save = self.i
        try:
            return self.quantifier() is not None
        finally:
            self.i = save

    def quantifier(self) -> tuple[int, int | None] | None:
        c = self.peek()
        if c is None:
            return None
        if c in "*+?":
            self.i += 1
            q = {"*": (0, None), "+": (1, None), "?": (0, 1)}[c]
        elif c == "{":
            j = self.i + 1
            lo_start = j
            while j < len(self.s) and self.s[j].isdigit() and self.s[j].isascii():
                j += 1
            if j == lo_start:
                return None
            lo, hi = int(self.s[lo_start:j]), None
            if j < len(self.s) and self.s[j] == ",":
                j += 1
                hi_start = j
                while j < len(self.s) and self.s[j].isdigit() and self.s[j].isascii():
                    j += 1
                hi = int(self.s[hi_start:j]) if j > hi_start else None
            else:
                hi = lo
            if j >= len(self.s) or self.s[j] != "}":
                return None
            self.i = j + 1
            if hi is not None and hi < lo:
                raise self.error(f"numbers out of order in {{{lo},{hi}}} quantifier")
            if max(lo, hi or 0) > MAX_REPEAT:
                raise self.error(f"a repetition count above {MAX_REPEAT}")
            q = (lo, hi)
        else:
            return None
        if self.peek() == "?":  # lazy: the same strings match
            self.i += 1
        return q

    def group(self) -> tuple:
        self.i += 1
        if self.peek() == "?":
            nxt = self.peek(1)
            if nxt == ":":
                self.i += 2
            elif nxt == "<" and self.peek(2) not in ("=", "!"):
                end = self.s.find(">", self.i)
                if end < 0 or end == self.i + 2:
                    raise self.error("a bad group name")
                self.i = end + 1
            elif nxt in ("=", "!") or nxt == "<":
                raise self.error("lookahead and lookbehind assertions are not supported")
            else:
                raise self.error("an invalid group")
        node = self.disjunction()
        if self.peek() != ")":
            raise self.error("missing ')'")
        self.i += 1
        return node

    def class_escape(self) -> str | Ranges:
        """Step past a backslash: the ranges of a class escape (\\d, \\w, ...; consumed), else the
        escaped character (not consumed, for the caller's own rules)."""
        self.i += 1
        c = self.peek()
        if c is None:
            raise self.error("'\\' at the end of the pattern")
        if c in _CLASS_ESCAPES:
            self.i += 1
            return _CLASS_ESCAPES[c]
        return c

    def atom_escape(self) -> tuple:
        c = self.class_escape()
        if not isinstance(c, str):
            return ("set", c)
        if c in "bB":
            raise self.error("word-boundary assertions (\\b, \\B) are not supported")
        if c in "123456789" or c == "k":
            raise self.error("backreferences are not supported")
        cp = self.char_escape()
        return ("set", normalize([(cp, cp)]))

    def char_escape(self) -> int:
        """The code point of the escape after a backslash (self.i at its first character)."""
        c = self.s[self.i]
        self.i += 1
        if c in _CONTROL_ESCAPES:
            return _CONTROL_ESCAPES[c]
        if c == "0":
            if self.peek() is not None and self.peek().isdigit():
                raise self.error("octal escapes are not supported")
            return 0
        if c == "c":
            letter = self.peek()
            if letter is None or not (letter.isascii() and letter.isalpha()):
                raise self.error("'\\c' needs a letter")
            self.i += 1
            return ord(letter) % 32
        if c == "x":
            digits = self.s[self.i:self.i + 2]
            if len(digits) != 2 or not set(digits) <= _HEXDIGITS:
                raise self.error("'\\x' needs two hex digits")
            self.i += 2
            return int(digits, 16)
        if c == "u":
            return self.unicode_escape()
        if c in "pP":
            raise self.error("Unicode property escapes (\\p{...}) are not supported")
        if c.isalnum() or c == "_":
            raise self.error(f"unknown escape '\\{c}'")
        return ord(c)  # escaped punctuation (identity escape)

    def unicode_escape(self) -> int:
        if self.peek() == "{":
            end = self.s.find("}", self.i)
            digits = self.s[self.i + 1:end] if end > 0 else ""
            if not digits or not set(digits) <= _HEXDIGITS or int(digits, 16) > MAX_CP:
                raise self.error("'\\u{...}' needs a hex code point up to 10FFFF")
            self.i = end + 1
            return int(digits, 16)
        digits = self.s[self.i:self.i + 4]
        if len(digits) != 4 or not set(digits) <= _HEXDIGITS:
            raise self.error("'\\u' needs four hex digits")
        self.i += 4
        cp = int(digits, 16)
        if 0xD800 <= cp <= 0xDBFF and self.s[self.i:self.i + 2] == "\\u":
            low = self.s[self.i + 2:self.i + 6]
            if len(low) == 4 and set(low) <= _HEXDIGITS and 0xDC00 <= int(low, 16) <= 0xDFFF:
                self.i += 6
                return 0x10000 + ((cp - 0xD800) << 10) + (int(low, 16) - 0xDC00)
        return cp  # a lone surrogate: it matches nothing a JSON string can hold

    def char_class(self) -> Ranges:
        self.i += 1
        negated = self.peek() == "^"
        if negated:
            self.i += 1
        items: list[tuple[int, int]] = []
        while True:
            c = self.peek()
            if c is None:
                raise self.error("unterminated character class")
            if c == "]":
                self.i += 1
                break
            a = self.class_atom()
            if self.peek() == "-" and self.peek(1) not in (None, "]"):
                self.i += 1
                b = self.class_atom()
                if isinstance(a, int) and isinstance(b, int):
                    if a > b:
                        raise self.error("range out of order in character class")
                    items.append((a, b))
                    continue
                items.append((0x2D, 0x2D))  # [\d-z]: the '-' is literal (Annex B)
                for x in (a, b):
                    items.extend([(x, x)] if isinstance(x, int) else x)
                continue
            items.extend([(a, a)] if isinstance(a, int) else a)
        ranges = normalize(items)
        return negate(ranges) if negated else ranges

    def class_atom(self) -> int | Ranges:
        c = self.s[self.i]
        if c != "\\":
            self.i += 1
            return ord(c)
        c = self.class_escape()
        if not isinstance(c, str):
            return c
        if c == "b":
            self.i += 1
            return 0x08
        if c == "-":
            self.i += 1
            return 0x2D
        if c in "123456789" or c == "B" or c == "k":
            raise self.error(f"'\\{c}' is not allowed in a character class")
        return self.char_escape()


# ---------------------------------------------------------------------------------------------------
# NFA (Thompson) with anchor edges: "^" edges are followed only at the start, "$" edges only at the end.


class _NFA:
    def __init__(self) -> None:
        self.eps: list[list[int]] = []
        self.bol: list[list[int]] = []
        self.eol: list[list[int]] = []
        self.edges: list[list[tuple[Ranges, int]]] = []

    def new(self) -> int:
        if len(self.eps) >= MAX_NFA_STATES:
            raise RegexError(f"the pattern is too large (over {MAX_NFA_STATES} automaton states)")
        for lst in (self.eps, self.bol, self.eol, self.edges):
            lst.append([])
        return len(self.eps) - 1

    def build(self, node: tuple, start: int) -> int:
        """Add ``node`` from state ``start``; return its end state."""
        kind = node[0]
        if kind == "set":
            end = self.new()
            if node[1]:
                self.edges[start].append((node[1], end))
            return end
        if kind == "cat":
            for item in node[1]:
                start = self.build(item, start)
            return start
        if kind == "alt":
            end = self.new()
            for alt in node[1]:
                s = self.new()
                self.eps[start].append(s)
                self.eps[self.build(alt, s)].append(end)
            return end
        if kind == "rep":
            _, sub, lo, hi = node
            cur = start
            for _ in range(lo):
                cur = self.build(sub, cur)
            if hi is None:
                loop = self.new()
                self.eps[cur].append(loop)
                self.eps[self.build(sub, loop)].append(loop)
                return loop
            end = self.new()
            self.eps[cur].append(end)
            for _ in range(hi - lo):
                cur = self.build(sub, cur)
                self.eps[cur].append(end)
            return end
        end = self.new()
        (self.bol if kind == "bol" else self.eol)[start].append(end)
        return end

    def closure(self, states: Iterable[int], at_start: bool, at_end: bool = False) -> frozenset:
        seen = set(states)
        stack = list(seen)
        while stack:
            s = stack.pop()
            nxt = self.eps[s] + (self.bol[s] if at_start else []) + (self.eol[s] if at_end else [])
            for t in nxt:
                if t not in seen:
                    seen.add(t)
                    stack.append(t)
        return frozenset(seen)


# ---------------------------------------------------------------------------------------------------
# DFA


class DFA:
    """A DFA over code points; every state can still reach an accepting one; the start is state 0.

    ``lo[s]``, ``hi[s]``, ``to[s]`` are state s's transitions: code points in ``[lo[s][i], hi[s][i]]``
    go to ``to[s][i]`` (sorted by ``lo``).
    """

    __slots__ = ("lo", "hi", "to", "accept", "_layers", "_period_start", "_length_memo", "__weakref__")

    def __init__(self, trans: Sequence[Sequence[tuple[int, int, int]]], accept: Sequence[bool]) -> None:
        self.lo = [[a for a, _, _ in t] for t in trans]
        self.hi = [[b for _, b, _ in t] for t in trans]
        self.to = [[c for _, _, c in t] for t in trans]
        self.accept = list(accept)
        self._layers: list[frozenset] | None = None
        self._period_start = 0
        self._length_memo: dict = {}

    @property
    def num_states(self) -> int:
        return len(self.accept)

    def step(self, s: int, cp: int) -> int:
        """The state after code point ``cp`` from ``s``, or -1."""
        i = bisect.bisect_right(self.lo[s], cp) - 1
        return self.to[s][i] if i >= 0 and cp <= self.hi[s][i] else -1

    def targets(self, s: int, lo: int, hi: int) -> list[int]:
        """States reached from ``s`` by some code point in ``[lo, hi]``."""
        los, his, tos = self.lo[s], self.hi[s], self.to[s]
        i = max(bisect.bisect_right(los, lo) - 1, 0)
        out = []
        while i < len(los) and los[i] <= hi:
            if his[i] >= lo:
                out.append(tos[i])
            i += 1
        return out

    def matches(self, text: str) -> bool:
        s = 0
        for ch in text:
            s = self.step(s, ord(ch))
            if s < 0:
                return False
        return self.accept[s]

    def has_length(self, s: int, lo: int, hi: int | None) -> bool:
        """Whether some string of length in ``[lo, hi]`` (``hi`` None: unbounded) leads from ``s`` to acceptance."""
        key = (s, lo, hi)
        memo = self._length_memo
        if key in memo:
            return memo[key]
        if self._layers is None:
            self._build_layers()
        layers, j = self._layers, self._period_start
        p = len(layers) - j
        top = max(lo, j) + p - 1
        if hi is not None:
            top = min(hi, top)
        ok = False
        for n in range(lo, top + 1):
            if s in layers[n if n < len(layers) else j + (n - j) % p]:
                ok = True
                break
        if len(memo) > 100_000:
            memo.clear()
        memo[key] = ok
        return ok

    def _build_layers(self) -> None:
        """layers[n]: the states with an accepting path of exactly n characters; eventually periodic."""
        pred: list[set[int]] = [set() for _ in self.accept]
        for s, tos in enumerate(self.to):
            for t in tos:
                pred[t].add(s)
        layer = frozenset(s for s, a in enumerate(self.accept) if a)
        layers, seen = [layer], {layer: 0}
        while True:
            layer = frozenset(p for s in layer for p in pred[s])
            if layer in seen:
                self._period_start = seen[layer]
                break
            if len(layers) >= MAX_LENGTH_LAYERS:
                raise RegexError("the pattern is too complex to combine with length limits")
            seen[layer] = len(layers)
            layers.append(layer)
        self._layers = layers

    def intersect(self, other: "DFA") -> "DFA | None":
        """The DFA of the strings both accept (None if there are none)."""
        index = {(0, 0): 0}
        order = [(0, 0)]
        trans: list[list[tuple[int, int, int]]] = []
        k = 0
        while k < len(order):
            a, b = order[k]
            k += 1
            out = []
            la, ha, ta = self.lo[a], self.hi[a], self.to[a]
            lb, hb, tb = other.lo[b], other.hi[b], other.to[b]
            i = j = 0
            while i < len(la) and j < len(lb):
                lo, hi = max(la[i], lb[j]), min(ha[i], hb[j])
                if lo <= hi:
                    pair = (ta[i], tb[j])
                    if pair not in index:
                        index[pair] = len(order)
                        order.append(pair)
                    out.append((lo, hi, index[pair]))
                if ha[i] < hb[j]:
                    i += 1
                else:
                    j += 1
            trans.append(out)
            if len(order) > MAX_DFA_STATES * 4:
                raise RegexError("the combined patterns are too large")
        return _finish(trans, [self.accept[a] and other.accept[b] for a, b in order])


MINIMIZE_BUDGET = 300_000  # state signatures Moore's refinement may compute (rounds x states)


def _finish(trans: list[list[tuple[int, int, int]]], accept: list[bool]) -> DFA | None:
    """Minimise (Moore's refinement, within MINIMIZE_BUDGET: a long chain of states can need one round
    per state, and is then left as it is), drop states that cannot reach acceptance; None if the start
    cannot."""
    n = len(accept)
    cls = [1 if a else 0 for a in accept]
    count = len(set(cls))
    work = 0
    while True:
        work += n
        if work > MINIMIZE_BUDGET:
            cls = list(range(n))  # not converged: a partial refinement would merge distinct states
            break
        sigs: dict[tuple, int] = {}
        new = []
        for s in range(n):
            sig: list = [cls[s]]
            for lo, hi, t in trans[s]:
                c = cls[t]
                if len(sig) > 1 and sig[-1][2] == c and sig[-1][1] + 1 == lo:
                    sig[-1] = (sig[-1][0], hi, c)
                else:
                    sig.append((lo, hi, c))
            new.append(sigs.setdefault(tuple(sig), len(sigs)))
        cls = new
        if len(sigs) == count:
            break
        count = len(sigs)
    # one representative per class, then keep the live classes reachable from the start
    rep: dict[int, int] = {}
    for s in range(n):
        rep.setdefault(cls[s], s)
    live = {cls[s] for s in range(n) if accept[s]}
    pred: dict[int, set[int]] = {}
    for c, s in rep.items():
        for _, _, t in trans[s]:
            pred.setdefault(cls[t], set()).add(c)
    stack = list(live)
    while stack:
        c = stack.pop()
        for p in pred.get(c, ()):
            if p not in live:
                live.add(p)
                stack.append(p)
    if cls[0] not in live:
        return None
    number = {cls[0]: 0}
    order = [cls[0]]
    out_trans = []
    k = 0
    while k < len(order):
        c = order[k]
        k += 1
        row: list[tuple[int, int, int]] = []
        for lo, hi, t in trans[rep[c]]:
            tc = cls[t]
            if tc not in live:
                continue
            if tc not in number:
                number[tc] = len(order)
                order.append(tc)
            if row and row[-1][2] == number[tc] and row[-1][1] + 1 == lo:
                row[-1] = (row[-1][0], hi, number[tc])
            else:
                row.append((lo, hi, number[tc]))
        out_trans.append(row)
    return DFA(out_trans, [accept[rep[c]] for c in order])


@functools.lru_cache(maxsize=256)
def compile_search(pattern: str) -> DFA | None:
    """The DFA of the strings in which ``pattern`` finds a match (None: no string has one).

    Raises:
        RegexError: the pattern is invalid or uses something unsupported (the message says what).
    """
    if not isinstance(pattern, str):
        raise RegexError(f"a pattern must be a string, got {type(pattern).__name__}")
    tree = _Parser(pattern).parse()
    nfa = _NFA()
    first = nfa.new()
    nfa.edges[first].append((ANY, first))  # any prefix before the match
    begin = nfa.new()
    nfa.eps[first].append(begin)
    final = nfa.new()
    nfa.eps[nfa.build(tree, begin)].append(final)
    nfa.edges[final].append((ANY, final))  # any suffix after it
    # After the first character only states that reach the end without a "^" edge matter (this drops
    # the any-prefix loop of an anchored pattern at once).
    back: list[list[int]] = [[] for _ in nfa.eps]
    for s, outs in enumerate(nfa.eps):
        for t in outs + nfa.eol[s] + [t for _, t in nfa.edges[s]]:
            back[t].append(s)
    useful, stack = {final}, [final]
    while stack:
        for s in back[stack.pop()]:
            if s not in useful:
                useful.add(s)
                stack.append(s)
    start = nfa.closure([first], at_start=True)
    index = {(start, True): 0}
    order = [(start, True)]
    trans: list[list[tuple[int, int, int]]] = []
    accept: list[bool] = []
    k = 0
    while k < len(order):
        states, at_start = order[k]
        k += 1
        accept.append(final in nfa.closure(states, at_start, at_end=True))
        edges = [(r, t) for s in states for rs, t in nfa.edges[s] for r in rs]
        points = sorted({p for (lo, hi), _ in edges for p in (lo, hi + 1)})
        hits: list[set[int]] = [set() for _ in points]
        for (lo, hi), t in edges:
            for i in range(bisect.bisect_left(points, lo), bisect.bisect_left(points, hi + 1)):
                hits[i].add(t)
        row: list[tuple[int, int, int]] = []
        for i, ts in enumerate(hits):
            if not ts:
                continue
            key = (nfa.closure(ts, at_start=False) & useful, False)
            if not key[0]:
                continue
            if key not in index:
                index[key] = len(order)
                order.append(key)
                if len(order) > MAX_DFA_STATES:
                    raise RegexError(f"the pattern is too complex (over {MAX_DFA_STATES} automaton states)")
            lo, hi = points[i], points[i + 1] - 1
            if row and row[-1][2] == index[key] and row[-1][1] + 1 == lo:
                row[-1] = (row[-1][0], hi, index[key])
            else:
                row.append((lo, hi, index[key]))
        trans.append(row)
    return _finish(trans, accept)
