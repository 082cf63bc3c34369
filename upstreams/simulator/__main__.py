"""``python -m upstreams.simulator --profile base --port 8001``"""

from .app import main

main()
