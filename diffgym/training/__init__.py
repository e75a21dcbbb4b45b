"""The training spec shared by every trainer plugin: one config, one actor-critic, one observation
normalizer, one optimizer, one evaluation routine, one rollout of the tensor API and one run-output format
(see ``docs/plugins.md``)."""

from diffgym.training.evaluation import EVAL_SEED_OFFSET, evaluate_config, evaluate_policy
from diffgym.training.networks import ActorCritic, mlp
from diffgym.training.normalization import ObservationNormalizer
from diffgym.training.optim import clip_gradients, make_optimizer
from diffgym.training.rollout import EnvBatch, EvaluationCadence, Rollout, evaluate_and_checkpoint, unroll
from diffgym.training.run import Run, default_run_dir
from diffgym.training.spec import NormalizerSpec, OptimizerSpec, PolicySpec, TrainConfig

__all__ = ["ActorCritic", "EVAL_SEED_OFFSET", "EnvBatch", "EvaluationCadence", "NormalizerSpec",
           "ObservationNormalizer", "OptimizerSpec", "PolicySpec", "Rollout", "Run", "TrainConfig", "clip_gradients",
           "default_run_dir", "evaluate_and_checkpoint", "evaluate_config", "evaluate_policy", "make_optimizer", "mlp",
           "unroll"]
