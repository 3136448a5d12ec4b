"""Capacity planning from a Hugging Face config: does it fit, how fast, at what cost.

    from rebel.plan import plan, search
    print(plan("config.json", hardware="RBLN-CA25", tp=4, batch=[1, 8, 64]))
    print(search("config.json", rps=10, ttft_ms=500, tpot_ms=50))

The model is built on meta tensors (no weights) and compiled by the same compiler and timed by
the same event engine as every run (`predict`); `rbln-plan` is the command line over it.
Needs transformers (the `hf` extra), as the model classes are transformers' own.
"""
from .model import SUPPORTED, ModelShape, build_meta_model, read_config, shape_of
from .planner import (DecodePoint, Deployment, Plan, Planner, SearchResult, min_cards, plan,
                      search)
from .predict import Breakdown, Memory, PhaseTime, PredictedStepCost, Predictor

__all__ = ["SUPPORTED", "Breakdown", "DecodePoint", "Deployment", "Memory", "ModelShape",
           "PhaseTime", "Plan", "Planner", "PredictedStepCost", "Predictor", "SearchResult", "build_meta_model",
           "min_cards", "plan", "read_config", "search", "shape_of"]
