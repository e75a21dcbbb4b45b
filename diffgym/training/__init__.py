"""The training spec shared by every trainer plugin: one config, one actor-critic, one observation
normalizer, one optimizer, one evaluation routine and one run-output format (see ``docs/plugins.md``)."""

from diffgym.training.evaluation import EVAL_SEED_OFFSET, evaluate_policy
from diffgym.training.networks import ActorCritic, mlp
from diffgym.training.normalization import ObservationNormalizer
from diffgym.training.optim import clip_gradients, make_optimizer
from diffgym.training.run import Run, default_run_dir
from diffgym.training.spec import NormalizerSpec, OptimizerSpec, PolicySpec, TrainConfig

__all__ = ["ActorCritic", "EVAL_SEED_OFFSET", "NormalizerSpec", "ObservationNormalizer", "OptimizerSpec",
           "PolicySpec", "Run", "TrainConfig", "clip_gradients", "default_run_dir", "evaluate_policy",
           "make_optimizer", "mlp"]
