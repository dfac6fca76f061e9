"""Deployment: export a policy as a bundle, serve it over WebSocket + msgpack, play tasks through the
server, and push policies to the Hugging Face Hub.

    sampler.py   the sampling loops with explicit timesteps and noise, around a torch or ONNX network:
                 DDPM/DDIM around a denoiser (diffusion), Euler around a velocity field (flow)
    bundle.py    the bundle layout (deploy.json) and PolicyEngine: observation frames -> action chunk
    export.py    `simpo-robot export`: policy folder or Hub id -> bundle (LeRobot layout + ONNX)
    client.py    the robot-side client (numpy, msgpack, websockets only; copied verbatim to deploy/)
    server.py    `simpo-robot serve`: the asyncio policy server
    run_sim.py   `simpo-robot run-sim`: evaluate a task through a server (eval_info.json + latency)
    push.py      `simpo-robot push`: upload a policy with its model card in one commit
    testing.py   tiny random DiffusionPolicy / FlowPolicy checkpoints for tests and benchmarks
"""
