"""Following a job from a thread worker, reported to the UI as messages.

The worker reads the job's events.jsonl (through `appliance.jobs`) and posts one message per
event; progress messages replace each other when the UI is behind (`can_replace`), so a fast job
never floods the event loop. The follower never touches widgets: the screen that owns it handles
its messages.
"""

from __future__ import annotations

from textual.message import Message
from textual.message_pump import MessagePump

from appliance import events as ev
from appliance.jobs import Job


class JobEvent(Message):
    """One event of the followed job."""

    def __init__(self, job: Job, event: ev.Event) -> None:
        super().__init__()
        self.job = job
        self.event = event

    def can_replace(self, message: Message) -> bool:
        return (isinstance(message, JobEvent) and message.job is self.job
                and isinstance(message.event, ev.Progress) and isinstance(self.event, ev.Progress))


class JobEnded(Message):
    """The followed job is over: `done` holds its result, else `error` says why it ended."""

    def __init__(self, job: Job, done: ev.Done | None, error: ev.Error | None) -> None:
        super().__init__()
        self.job = job
        self.done = done
        self.error = error


def follow(job: Job, post: MessagePump) -> None:
    """Read the job's events until it ends, posting them with `post` (a widget's post_message).

    Runs in a thread worker. A job that dies without its last word (killed by the kernel) still
    ends with an error: `Job.follow` writes one on its behalf.
    """
    from textual.worker import get_current_worker

    worker = get_current_worker()
    send = post.post_message
    done: ev.Done | None = None
    error: ev.Error | None = None
    for event in job.follow(poll_s=0.1, stop=lambda: worker.is_cancelled):
        send(JobEvent(job, event))
        if isinstance(event, ev.Done):
            done = event
        elif isinstance(event, ev.Error):
            error = event
    if worker.is_cancelled:
        return  # the screen or the app is closing; the job carries on and can be attached to again
    if done is None and error is None:
        error = ev.Error(title="Job ended unexpectedly", message="the job ended without reporting a result",
                         hint=f"The last lines of {job.log_path} show what happened.")
    send(JobEnded(job, done, error))
