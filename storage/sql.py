"""Every statement the store runs, in one place.

Statements are assembled from the constant fragments below and nothing else;
values are always bound as parameters. (Hence the file-wide S608 exemption.)

Visibility for the job facade: only mode ``store`` jobs, and for a viewer that is
not None only its own. ``:viewer`` is bound NULL for the superuser.
"""
# ruff: noqa: S608

from __future__ import annotations

JOB_COLUMNS = (
    "id, mode, state, user, database, method, target, headers, auth, body,"
    " created, upstream_id, attempts"
)
RESULT_COLUMNS = "status, rheaders, rbody"

VISIBLE = "mode = 'store' AND (:viewer IS NULL OR user = :viewer)"
PENDING = "state IN ('accepted', 'submitted')"

# The sequence remembers the ids of rows deleted since: they must never come back.
HIGH_WATER_AND_UNFINISHED = (
    "SELECT max(coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'jobs'), 0),"
    " coalesce((SELECT max(id) FROM jobs), 0)),"
    f" (SELECT count(*) FROM jobs WHERE {PENDING})"
)

INSERT_JOB = (
    "INSERT INTO jobs (id, mode, state, user, database, method, target, headers, auth, body,"
    " created, attempts) VALUES (?, ?, 'accepted', ?, ?, ?, ?, ?, ?, ?, ?, 0)"
)
MARK_SUBMITTED = (
    "UPDATE jobs SET state = 'submitted', upstream_id = ? WHERE id = ? AND state = 'accepted'"
)
REQUEUE = (
    "UPDATE jobs SET state = 'accepted', upstream_id = NULL, attempts = attempts + 1"
    " WHERE id = ? AND state = 'submitted'"
)
# Two state parameters: a single from-state is bound twice.
# A forgotten job's result is not written at all: the row is deleted right after
# (the schema's trigger) and must not need a page more on a full disk first.
FINISH = (
    "UPDATE jobs SET state = 'done', finished = ?, status = ?,"
    " rheaders = CASE mode WHEN 'store' THEN ? END, rbody = CASE mode WHEN 'store' THEN ? END,"
    " auth = NULL, headers = NULL, body = NULL WHERE id = ? AND state IN (?, ?)"
)

SELECT_ACCEPTED = (
    f"SELECT {JOB_COLUMNS} FROM jobs WHERE state = 'accepted'"
    " AND id NOT IN (SELECT value FROM json_each(:exclude)) ORDER BY id LIMIT :limit"
)
SELECT_SUBMITTED = f"SELECT {JOB_COLUMNS} FROM jobs WHERE state = 'submitted' ORDER BY id"
SELECT_STATE = f"SELECT state FROM jobs WHERE id = :id AND {VISIBLE}"
SELECT_PENDING_JOB = f"SELECT {JOB_COLUMNS} FROM jobs WHERE id = :id AND {PENDING} AND {VISIBLE}"
LIST_DONE = f"SELECT id FROM jobs WHERE state = 'done' AND {VISIBLE} ORDER BY id LIMIT :limit"
LIST_PENDING = f"SELECT id FROM jobs WHERE {PENDING} AND {VISIBLE} ORDER BY id LIMIT :limit"

TAKE_RESULT = (
    f"DELETE FROM jobs WHERE id = :id AND state = 'done' AND {VISIBLE} RETURNING {RESULT_COLUMNS}"
)
# Deleting removes done jobs and forgets unfinished ones (they run on, result dropped):
# each delete_* method runs its pair in one write.
DELETE_DONE = f"DELETE FROM jobs WHERE state = 'done' AND {VISIBLE}"
FORGET = f"UPDATE jobs SET mode = 'true' WHERE {PENDING} AND {VISIBLE}"
DELETE_DONE_ONE = f"{DELETE_DONE} AND id = :id"
FORGET_ONE = f"{FORGET} AND id = :id"
DELETE_DONE_EXPIRED = f"{DELETE_DONE} AND finished < :stamp"
FORGET_EXPIRED = f"{FORGET} AND created < :stamp"
