"""Container health check: exit 0 when URL answers 200, else 1 (standard library only).

Used by the proxy image's HEALTHCHECK and mounted into the vLLM containers, so no image needs
curl. Usage: python healthcheck.py http://127.0.0.1:8080/health
"""

import sys
import urllib.error
import urllib.request


def healthy(url: str, timeout: float = 5.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: healthcheck.py URL")
    sys.exit(0 if healthy(sys.argv[1]) else 1)
