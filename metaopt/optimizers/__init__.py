"""Optimizers for metaopt, learned and hand-designed, behind one registry.

from metaopt import optimizers
optimizers.names()                       # ['adafac_mlp', 'adam', 'adamw', ...]
opt = optimizers.make("small_fc", hidden=32)
"""

from metaopt.optimizers.adafac_mlp import AdafacMLP, AdafacMLPState
from metaopt.optimizers.base import Optimizer
from metaopt.optimizers.curvature import FOOF, KFAC, MBF, scale_by_foof, scale_by_kfac, scale_by_mbf
from metaopt.optimizers.hand_designed import SGD, Adam, AdamCosine, AdamW, Lamb, Lars, Momentum
from metaopt.optimizers.lgl2o import LGL2O, LGL2OState, lgl2o
from metaopt.optimizers.lookahead import Lookahead, LookaheadState
from metaopt.optimizers.lstm_l2l import LSTML2L, LSTML2LState
from metaopt.optimizers.mfac import MFAC, scale_by_mfac
from metaopt.optimizers.nn_adam import NNAdam, NNAdamState
from metaopt.optimizers.nominal_mlp import NominalMLP, NominalMLPState
from metaopt.optimizers.registry import check, make, names, register
from metaopt.optimizers.rnn_mlp import RNNMLP, RNNMLPState
from metaopt.optimizers.slots import SlotResetError, reset_slots
from metaopt.optimizers.small_fc import SmallFC, SmallFCState

register("adam", Adam)
register("adam_cosine", AdamCosine)
register("small_fc", SmallFC)
register("sgd", SGD)
register("momentum", Momentum)
register("adamw", AdamW)
register("lamb", Lamb)
register("lars", Lars)
register("mfac", MFAC)
register("kfac", KFAC)
register("foof", FOOF)
register("mbf", MBF)
register("lookahead", Lookahead)
register("adafac_mlp", AdafacMLP)
register("lgl2o", lgl2o)
register("lstm_l2l", LSTML2L)
register("nn_adam", NNAdam)
register("rnn_mlp", RNNMLP)
register("nominal_mlp", NominalMLP)

__all__ = [
    "AdafacMLP",
    "AdafacMLPState",
    "AdamCosine",
    "AdamW",
    "FOOF",
    "KFAC",
    "MBF",
    "LGL2O",
    "LGL2OState",
    "Lamb",
    "Lars",
    "Lookahead",
    "MFAC",
    "LookaheadState",
    "Momentum",
    "SGD",
    "SlotResetError",
    "Adam",
    "Optimizer",
    "SmallFC",
    "SmallFCState",
    "LSTML2L",
    "LSTML2LState",
    "NNAdam",
    "NNAdamState",
    "NominalMLP",
    "NominalMLPState",
    "RNNMLP",
    "RNNMLPState",
    "check",
    "make",
    "names",
    "register",
    "reset_slots",
    "scale_by_foof",
    "scale_by_kfac",
    "scale_by_mbf",
    "scale_by_mfac",
]
