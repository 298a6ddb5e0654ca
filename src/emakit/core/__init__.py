"""The trainer's core: events, the algorithm and callback bases, the run's state, and the engine that runs them."""

from emakit.core.algorithm import Algorithm, as_algorithm
from emakit.core.callback import Callback
from emakit.core.engine import Engine
from emakit.core.event import Event
from emakit.core.state import State

__all__ = ["Algorithm", "Callback", "Engine", "Event", "State", "as_algorithm"]
