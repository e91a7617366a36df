"""The names of the adversary's attacks and directions, without importing torch: the CLI lists them in ``--help``
and argument errors, which must answer at once (see :mod:`peers.adversary` for what each attack does)."""

CHAIN_ATTACKS = ("noise", "signflip", "scale", "zero", "constant", "random", "replay", "alie")
AVERAGING_ATTACKS = (
    "avg-scale",
    "avg-signflip",
    "avg-weight",
    "avg-aggregate",
    "avg-equivocate",
    "avg-state",
    "avg-progress",
)
ATTACKS = CHAIN_ATTACKS + AVERAGING_ATTACKS
DIRECTIONS = ("forward", "backward", "both")
