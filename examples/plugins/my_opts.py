"""An optimizer of my own: heavy-ball momentum whose step size and momentum are learned
(docs/plugins.md). A job spec names it `optimizer: {name: "my_opts:LearnedMomentum"}`."""

import dataclasses

import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class LearnedMomentum:
    init_lr: float = 0.01  # θ's starting point; hparams are the dataclass fields

    name = "learned_momentum"
    description = "heavy-ball momentum with a learned log step size and momentum logit"
    learned = True

    @property
    def hparams(self):
        return dataclasses.asdict(self)

    def init(self, key):
        return {"log_lr": jnp.log(jnp.float32(self.init_lr)), "beta_logit": jnp.float32(2.0)}

    def as_optax(self, theta, num_steps):
        beta, lr = jax.nn.sigmoid(theta["beta_logit"]), jnp.exp(theta["log_lr"])
        return optax.with_extra_args_support(optax.chain(optax.trace(decay=beta), optax.scale(-lr)))
