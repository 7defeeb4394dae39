"""Tasks by the name the run config's `task` key uses."""

from .digits import DigitsTask

TASKS = {
    "digits": DigitsTask,
}
