"""A multi grader's `calculate_output`, parsed with `ast` and evaluated by walking the tree.

Never eval(): the formula may come from a request to the fine-tuning service. Only numbers,
the sub-graders' names, + - * / **, unary minus, parentheses and a few math functions pass the
check, which runs when the grader is built so a bad formula fails before any rollout.
"""

from __future__ import annotations

import ast
import math
import operator
from dataclasses import dataclass

from rayft.graders.spec import GraderError

# name -> (function, least and most arguments)
FUNCTIONS = {
    "min": (min, 2, None),
    "max": (max, 2, None),
    "abs": (abs, 1, 1),
    "floor": (math.floor, 1, 1),
    "ceil": (math.ceil, 1, 1),
    "exp": (math.exp, 1, 1),
    "sqrt": (math.sqrt, 1, 1),
    "log": (math.log, 1, 2),
}
# math.pow, not **: a negative base to a fractional power is a ValueError, not a complex number.
_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Pow: math.pow,
}
_SYMBOLS = {
    ast.BitXor: "^ (write ** for a power)",
    ast.Mod: "%",
    ast.FloorDiv: "//",
    ast.MatMult: "@",
    ast.BitAnd: "&",
    ast.BitOr: "|",
    ast.LShift: "<<",
    ast.RShift: ">>",
    ast.UAdd: "unary +",
    ast.Not: "not",
    ast.Invert: "~",
}


@dataclass(frozen=True)
class Formula:
    source: str
    tree: ast.Expression

    def __call__(self, values: dict[str, float]) -> float:
        """The formula's value; ZeroDivisionError, ValueError or OverflowError when it has none."""
        result = _evaluate(self.tree.body, values)
        if not math.isfinite(result):
            raise ValueError(f"the result is {result}")
        return result


def parse_formula(source: str, names: list[str], where: str) -> Formula:
    if not isinstance(source, str) or not source.strip():
        raise GraderError(f"{where}: must be a formula over {', '.join(names)}, got {source!r}")
    source = source.strip()
    try:
        tree = ast.parse(source, mode="eval")
    except SyntaxError as e:
        raise GraderError(f"{where}: {source!r} is not a formula: {e.msg}") from None
    _check(tree.body, source, names, where)
    return Formula(source, tree)


def _check(node: ast.AST, source: str, names: list[str], where: str) -> None:
    def refuse(token: str, why: str = "is not allowed") -> GraderError:
        return GraderError(
            f"{where}: {token!r} {why} in {source!r}; a formula takes numbers, the grader names "
            f"({', '.join(names)}), + - * / **, unary minus, parentheses and "
            f"{', '.join(FUNCTIONS)}"
        )

    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, int | float):
            raise refuse(repr(node.value))
    elif isinstance(node, ast.Name):
        if node.id not in names:
            raise refuse(node.id, "is not one of the multi grader's graders")
    elif isinstance(node, ast.BinOp):
        if type(node.op) not in _BINARY:
            raise refuse(_SYMBOLS.get(type(node.op), type(node.op).__name__))
        _check(node.left, source, names, where)
        _check(node.right, source, names, where)
    elif isinstance(node, ast.UnaryOp):
        if not isinstance(node.op, ast.USub):
            raise refuse(_SYMBOLS.get(type(node.op), type(node.op).__name__))
        _check(node.operand, source, names, where)
    elif isinstance(node, ast.Call):
        func = ast.get_source_segment(source, node.func) or "?"
        if not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS:
            raise refuse(func, "is not a function a formula may call")
        if node.keywords or any(isinstance(a, ast.Starred) for a in node.args):
            raise refuse(
                ast.get_source_segment(source, node) or func, "passes more than plain arguments"
            )
        _, least, most = FUNCTIONS[node.func.id]
        if len(node.args) < least or (most is not None and len(node.args) > most):
            count = (
                f"{least}"
                if least == most
                else f"{least} or more"
                if most is None
                else f"{least} to {most}"
            )
            raise refuse(
                ast.get_source_segment(source, node) or func, f"does not pass {count} arguments"
            )
        for arg in node.args:
            _check(arg, source, names, where)
    else:
        raise refuse(ast.get_source_segment(source, node) or type(node).__name__)


def _evaluate(node: ast.expr, values: dict[str, float]) -> float:
    if isinstance(node, ast.Constant):
        return float(node.value)  # floats, so 10 ** 10 ** 10 overflows instead of computing
    if isinstance(node, ast.Name):
        return float(values[node.id])
    if isinstance(node, ast.BinOp):
        return float(
            _BINARY[type(node.op)](_evaluate(node.left, values), _evaluate(node.right, values))
        )
    if isinstance(node, ast.UnaryOp):
        return -_evaluate(node.operand, values)
    assert isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
    return float(FUNCTIONS[node.func.id][0](*(_evaluate(a, values) for a in node.args)))
