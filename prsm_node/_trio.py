"""``TaskStatus`` for annotations: py-libp2p pulls in the trio-typing stubs, which shadow trio's
own inline types for mypy and do not define ``trio.TaskStatus``."""

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from trio_typing import TaskStatus
else:
    from trio import TaskStatus

__all__ = ["TaskStatus"]
