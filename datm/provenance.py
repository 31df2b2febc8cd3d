"""The identity of the code that computes an artifact, blind to comments and formatting.

Experts (`persist: true` in DVC) and distillation checkpoints outlive a stage run: a re-run
keeps experts and resumes checkpoints whose identity matches. Their identity must therefore
change when the code that computed them changes, or a fixed bug would live on in artifacts
DVC believes fresh. Hashing the parsed source (docstrings dropped) rather than the file's bytes
keeps a comment or a reformatting from throwing away hours of experts.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import inspect
from functools import cache
from types import ModuleType

_DEFINITIONS = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def source_digest(source: str) -> str:
    """sha256 of a module's syntax tree without docstrings (comments never reach the tree)."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, _DEFINITIONS) and node.body and isinstance(node.body[0], ast.Expr) \
                and isinstance(node.body[0].value, ast.Constant) \
                and isinstance(node.body[0].value.value, str):
            node.body = node.body[1:] or [ast.Pass()]
    return hashlib.sha256(ast.dump(tree, include_attributes=False).encode()).hexdigest()


@cache
def _module_digest(name: str) -> str:
    return source_digest(inspect.getsource(importlib.import_module(name)))


def code_digest(*modules: ModuleType | str) -> str:
    """One digest of several modules' code (order-independent), 16 hex digits."""
    names = sorted(m if isinstance(m, str) else m.__name__ for m in modules)
    joined = ":".join(f"{n}={_module_digest(n)}" for n in names)
    return hashlib.sha256(joined.encode()).hexdigest()[:16]
