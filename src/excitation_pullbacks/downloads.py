"""Whether a download can start: one short request before a library's download, which would otherwise retry or
wait on a dead network for tens of seconds (or without limit) before failing."""

from __future__ import annotations

import urllib.error
import urllib.request

__all__ = ["PROBE_TIMEOUT", "unreachable"]

#: Seconds one probe waits for the server.
PROBE_TIMEOUT = 4.0


def unreachable(url: str, timeout: float = PROBE_TIMEOUT) -> str | None:
    """Why ``url``'s server cannot be reached (no route, no name resolution, timeout), or None when it answers.

    One HEAD request through urllib (the proxies of the environment apply, as for torch.hub and torchvision
    downloads). Any HTTP status counts as an answer: whether the file is there is the download's business.
    """
    request = urllib.request.Request(url, method="HEAD")
    try:  # a fresh opener: urlopen's shared one keeps the proxies of its first use
        with urllib.request.build_opener().open(request, timeout=timeout):
            return None
    except urllib.error.HTTPError:
        return None
    except urllib.error.URLError as err:
        return str(err.reason)
    except TimeoutError:
        return f"no answer within {timeout:g} s"
    except OSError as err:
        return str(err)
