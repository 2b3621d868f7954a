"""iicl_fast: consolidate long contexts into LoRA memories (InfiniteICL), fast.

    model, tok = iicl_fast.load_model()
    mem = iicl_fast.Memory(model, tok, iicl_fast.Config())
    mem.consolidate(text); mem.ask("Who founded the institute?")
"""
__version__ = "0.1.0"

from .config import Config, IICLError
from .consolidate import ConsolidationReport
from .memory import Memory
from .models import load_model
from .retain import StreamingSession
from .bank import BankAdamW, GraphedBankStep, LoraBank
from .many import consolidate_many
from .driver import stream

__all__ = ["Config", "ConsolidationReport", "IICLError", "Memory", "StreamingSession", "LoraBank", "BankAdamW", "GraphedBankStep", "consolidate_many", "load_model", "stream", "__version__"]
