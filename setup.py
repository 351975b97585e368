"""palmax: a JAX/Flax, TPU-first codebase for Gemini/PaLM-style decoder language models."""
from setuptools import find_packages, setup

SERVE = ['starlette>=0.37', 'uvicorn>=0.30', 'prometheus_client>=0.20', 'jinja2>=3.1']
# launch.eval: Google's ROUGE (the scorer papers report) and EleutherAI's lm-evaluation-harness
# (palmax registers as its model; its YAML tasks run unchanged).
EVAL = ['rouge-score>=0.1.2', 'lm_eval>=0.4.5']

setup(
    name='palmax',
    version='0.1.0',
    description='Train, scale, fine-tune and serve Gemini/PaLM-style decoder LLMs in JAX/Flax.',
    python_requires='>=3.11',
    packages=find_packages(include=['model', 'model.*', 'train', 'train.*', 'launch', 'launch.*',
                                    'configs', 'configs.*']),
    install_requires=[
        'jax>=0.10.2',
        'flax>=0.12.8',
        'optax>=0.2.8',
        'orbax-checkpoint>=0.12.8',
        'sentencepiece>=0.2.0',
        'tensorflow-datasets>=4.9.10',
        'absl-py>=2.1',
        'ml_collections>=1.1.0',
        'numpy',
        'tensorboardX>=2.6',   # TensorBoard event files without installing TensorFlow.
    ],
    extras_require={
        # launch.serve: an ASGI app (Starlette) on uvicorn, Prometheus metrics, jinja2 for
        # checkpoints' chat templates.
        'serve': [*SERVE],
        'eval': [*EVAL],
        # openai: the client the server is tested against; scikit-learn: the kappa reference;
        # psutil: the sandbox tests look for leftover processes; trl: the SFT, DPO, reward-model
        # and GRPO loss references (and datasets, which its trainers take);
        # peft: LoRA adapter interop.
        'test': ['pytest>=8', 'pytest-xdist>=3.5', 'nbformat>=5.10', 'nbclient>=0.10', 'matplotlib',
                 'ipykernel>=6.29', 'openai>=1.0', 'scikit-learn', 'psutil', 'trl', 'peft'] + SERVE + EVAL,
        'tpu': ['jax[tpu]'],
        'cuda': ['jax[cuda12]'],
        'hf': ['torch>=2.4', 'transformers>=4.45', 'safetensors'],
        'tensorboard': ['tensorboard'],
        'gcs': ['gcsfs'],   # gs:// workdirs through etils.epath's fsspec backend (train/paths.py).   # The viewer; training writes event files without it.
    },
)
