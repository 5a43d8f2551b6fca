"""Local simulation of Globus Auth + Globus Groups for tests, demos and benchmarks.

Point the real ``globus_sdk`` at a running :class:`Simulator` through the
environment variables in :attr:`Simulator.env`; shape the data with a
:class:`World` and break things on purpose with :class:`Faults`.

    world = World.generate(groups=20, members=10, seed=1)
    sim = Simulator(world).start()
    os.environ.update(sim.env)
"""

from .server import MALFORMED_KINDS, Faults, Simulator, SimulatorSetupError, TLSFiles, serve, serve_cli
from .world import ROLES, STATUSES, Membership, World

__all__ = [
    "MALFORMED_KINDS",
    "ROLES",
    "STATUSES",
    "Faults",
    "Membership",
    "Simulator",
    "SimulatorSetupError",
    "TLSFiles",
    "World",
    "serve",
    "serve_cli",
]
