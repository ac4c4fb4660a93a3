"""Chat tasks: conversations for midtraining/SFT and questions for evaluation, one file per task.

Every task follows `base.Task` (len, index -> conversation dict, evaluate). Synthetic tasks are
generated offline; SmolTalk, MMLU and GSM8K read local parquet/jsonl files or download them by URL.
Real loaders are imported on use so that importing this package stays cheap.
"""

from .base import Conversation, Task
from .synthetic import (SYNTHETIC_TASKS, ArithmeticTask, FactsTask, IdentityTask, LetterCountTask, SpellingTask,
                        SyntheticTask)

__all__ = ["Conversation", "Task", "SyntheticTask", "SpellingTask", "LetterCountTask", "ArithmeticTask",
           "IdentityTask", "FactsTask", "SYNTHETIC_TASKS"]
