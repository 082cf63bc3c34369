"""``python -m upstreams.local --gguf smollm --port 8002``"""

from .app import main

main()
