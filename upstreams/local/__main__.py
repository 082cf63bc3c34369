"""``python -m upstreams.local --gguf smollm --port 8002``"""

from .cli import main

main()
