"""Which code a store may make this process import.

A store names the factory that rebuilds its model (``module:callable`` plus JSON kwargs),
and stores are data that people share. Naming code must never be enough to run it, so a
factory is imported only from a module the user trusts:

- the project's own models (``explaind_ql.models``) are always trusted;
- ``explaind_ql.open(path, trust=["mypkg.models"])`` (or ``query(..., trust=...)``);
- ``explaind-ql --trust mypkg.models ...`` on the command line;
- the ``EXPLAIND_QL_TRUST`` environment variable (comma-separated);
- ``trust = ["mypkg.models"]`` in the config file ``$EXPLAIND_QL_CONFIG`` or
  ``~/.config/explaind_ql/config.toml``.

Trusting ``mypkg`` trusts its submodules. The callable must be defined in a trusted module
(``mypkg.models:os.system`` is refused): the check is on the object's own ``__module__``,
and the attribute path may not pass through a module. Loss functions are never imported:
they come from the fixed registry in :mod:`explaind_ql.losses`.
"""

from __future__ import annotations

import importlib
import os
import tomllib
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from .errors import StoreError

ALWAYS = ("explaind_ql.models",)
ENV = "EXPLAIND_QL_TRUST"
CONFIG_ENV = "EXPLAIND_QL_CONFIG"
_session: list[str] = []  # modules trusted for this process (the CLI's --trust)


def config_path() -> Path:
    env = os.environ.get(CONFIG_ENV)
    if env:
        return Path(env)
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "explaind_ql" / "config.toml"


def _configured() -> list[str]:
    path = config_path()
    if not path.is_file():
        return []
    try:
        entry = tomllib.loads(path.read_text(encoding="utf-8")).get("trust", [])
    except (tomllib.TOMLDecodeError, OSError, UnicodeDecodeError) as exc:
        raise StoreError(f"cannot read the config file {path} ({exc}); fix or remove it") from None
    if not (isinstance(entry, list) and all(isinstance(m, str) for m in entry)):
        raise StoreError(f"'trust' in {path} must be a list of module names, like trust = [\"mypkg.models\"]")
    return entry


def allow(modules: Iterable[str]) -> None:
    """Trust ``modules`` for the rest of this process (what ``explaind-ql --trust`` does)."""
    _session.extend(m.strip() for m in modules if m.strip())


@dataclass(frozen=True)
class Trust:
    """The module prefixes this process may import a store's factory from."""

    modules: tuple[str, ...]

    @classmethod
    def current(cls, extra: Iterable[str] | str | None = None) -> Trust:
        """The built-in, configured, environment, session and ``extra`` modules together."""
        extra = [extra] if isinstance(extra, str) else list(extra or ())
        env = [m.strip() for m in os.environ.get(ENV, "").split(",") if m.strip()]
        return cls(tuple(dict.fromkeys([*ALWAYS, *_configured(), *env, *_session, *extra])))

    def allows(self, module: str) -> bool:
        return any(module == m or module.startswith(m + ".") for m in self.modules)

    def load(self, ref: str) -> Callable:
        """The factory ``ref`` (``module:callable``), imported only if its module is trusted."""
        module, _, attr = ref.partition(":")
        if not module or not attr:
            raise StoreError(f"the store's factory {ref!r} is not a 'module:callable' reference; "
                             "re-record the run")
        if not self.allows(module):
            raise self._refusal(ref, module)
        try:
            obj = importlib.import_module(module)
            for part in attr.split("."):
                obj = getattr(obj, part)
                if isinstance(obj, types.ModuleType):
                    raise StoreError(f"the store's factory {ref!r} reaches into module {obj.__name__}; "
                                     "a factory must be a callable defined in its module")
        except (ImportError, AttributeError, ValueError) as exc:
            raise StoreError(f"cannot rebuild the recorded model: cannot import factory {ref!r} "
                             f"({exc}); install the package that defines it") from None
        owner = getattr(obj, "__module__", None)
        if not callable(obj) or not isinstance(owner, str) or not self.allows(owner):
            raise StoreError(f"the store's factory {ref!r} is {type(obj).__name__} from module "
                             f"{owner!r}, not a callable defined in a trusted module; trust "
                             f"{owner!r} only if you mean to run it")
        return obj

    @staticmethod
    def _refusal(ref: str, module: str) -> StoreError:
        return StoreError(
            f"the store's model factory {ref!r} would import module '{module}', which is not trusted; "
            f"if you trust it, pass trust=['{module}'] to explaind_ql.open, --trust {module} to "
            f"explaind-ql, or add it to {ENV}")


__all__ = ["ALWAYS", "Trust", "allow", "config_path"]
