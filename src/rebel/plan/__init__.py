"""Capacity planning from a Hugging Face config: does it fit, how fast, at what cost.

    from rebel.plan import plan, search
    print(plan("config.json", hardware="RBLN-CA25", tp=4, batch=[1, 8, 64]))
    print(search("config.json", rps=10, ttft_ms=500, tpot_ms=50))
    print(EncoderPlanner("bert-large/").plan(batch=[1, 8], seq_len=[384]))     # encoders
    print(plan_pipeline("cosmos-7b-text2world/", tp=32))                      # diffusers folders

The model is built on meta tensors (no weights) and compiled by the same compiler and timed by
the same event engine as every run (`predict`); `rbln-plan` is the command line over it.
Needs transformers (the `hf` extra), as the model classes are transformers' own.
"""
from .encoder import ENCODERS, EncoderPlan, EncoderPlanner, EncoderPredictor
from .model import SUPPORTED, ModelShape, build_meta_model, read_config, shape_of
from .planner import (DecodePoint, Deployment, Plan, Planner, SearchResult, min_cards, plan,
                      search)
from .pipeline import PipelinePlan, plan_pipeline, read_pipeline
from .predict import Breakdown, Memory, PhaseTime, PredictedStepCost, Predictor

__all__ = ["ENCODERS", "SUPPORTED", "Breakdown", "EncoderPlan", "EncoderPlanner", "EncoderPredictor",
           "PipelinePlan", "plan_pipeline", "read_pipeline", "DecodePoint", "Deployment", "Memory", "ModelShape",
           "PhaseTime", "Plan", "Planner", "PredictedStepCost", "Predictor", "SearchResult", "build_meta_model",
           "min_cards", "plan", "read_config", "search", "shape_of"]
