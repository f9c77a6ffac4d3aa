"""The PyTorch inference DLC's entrypoint (``/usr/local/bin/dockerd-entrypoint.py``), as the image runs it.

SageMaker starts the container as ``docker run IMAGE serve``; the image's entrypoint then hands
``serve`` to the toolkit and, should the toolkit ever return, keeps the container alive (so a dead
TorchServe leaves a container whose /ping is refused: SageMaker's health check fails).
"""

import shlex
import subprocess
import sys

if sys.argv[1] == "serve":
    from sagemaker_pytorch_serving_container import serving

    serving.main()
else:
    subprocess.check_call(shlex.split(" ".join(sys.argv[1:])))

# prevent docker exit
subprocess.call(["tail", "-f", "/dev/null"])
