"""One rank of tests/test_session.py's multi-process save: load a model with this rank's shard, run a prompt and a
few sampled tokens, and save the session (the ranks gather the KV heads; rank 0 writes the file).

    tensorweave launch -n 2 -- python tests/spmd_state_worker.py MODEL OUT.tws 1,2,3
"""

import sys

import tensorweave as tw
from tensorweave.core.spmd import spmd_from_env

model = tw.load(sys.argv[1], communicator=spmd_from_env(), tensor_split=[3, 1], dtype="float64")
session = model.session()
session.eval([int(t) for t in sys.argv[3].split(",")])
session.generate(None, 4, temperature=0.9, seed=2)
session.save(sys.argv[2])
