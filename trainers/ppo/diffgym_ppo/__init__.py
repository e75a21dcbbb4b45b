"""DiffGym's PPO trainer plugin: Stable-Baselines3 PPO built from the shared ``diffgym.training`` spec.

Entry point ``ppo = diffgym_ppo:PPOTrainer`` in the ``diffgym.trainers`` group.
"""

from diffgym_ppo.policy import SpecActorCriticPolicy, SpecPPO
from diffgym_ppo.trainer import PPO_PARAMS, PPOTrainer, load_hyperparams
from diffgym_ppo.vec_env import SB3VecEnvAdapter

__version__ = "0.1.0"
__all__ = ["SB3VecEnvAdapter", "PPOTrainer", "PPO_PARAMS", "SpecActorCriticPolicy", "SpecPPO", "load_hyperparams"]
