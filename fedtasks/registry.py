"""Tasks by the name the run config's `task` key uses."""

from .chars import CharsTask
from .cifar100 import Cifar100Task
from .digits import DigitsTask
from .femnist import FemnistTask
from .speechcommands import SpeechCommandsTask

TASKS = {
    "chars": CharsTask,
    "digits": DigitsTask,
    "cifar100": Cifar100Task,
    "femnist": FemnistTask,
    "speechcommands": SpeechCommandsTask,
}
