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
    " created, upstream_id, attempts, cancelled"
)
RESULT_COLUMNS = "status, rheaders, rbody"

VISIBLE = "mode = 'store' AND (:viewer IS NULL OR user = :viewer)"
PENDING = "state IN ('accepted', 'submitted')"

# The sequence remembers the ids of rows deleted since: they must never come back.
# Done jobs are read through their partial index (the planner, without ANALYZE
# statistics, would pick jobs_state and read every row instead).
DONE_BY_AGE = "jobs INDEXED BY jobs_done_finished WHERE state = 'done'"
RESULT_BYTES = f"SELECT coalesce(sum(rsize), 0) FROM {DONE_BY_AGE}"
OPEN_COUNTS = (
    "SELECT max(coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'jobs'), 0),"
    " coalesce((SELECT max(id) FROM jobs), 0)),"
    f" (SELECT count(*) FROM jobs WHERE {PENDING}),"
    f" ({RESULT_BYTES})"
)

# (storage.batch runs consecutive ones as one statement of many VALUES rows, and fills
# it up with rows of NULLs: those are left out)
INSERT_JOB_VALUES = "(?, ?, 'accepted', ?, ?, ?, ?, ?, ?, ?, ?, 0)"
INSERT_JOB = (
    "INSERT INTO jobs (id, mode, state, user, database, method, target, headers, auth, body,"
    f" created, attempts) SELECT * FROM (VALUES {INSERT_JOB_VALUES}) WHERE column1 IS NOT NULL"
)
# A job its owner cancelled at ArangoDB is never sent again (see JobStore.requeue).
# Both act on the copy at ArangoDB under the given id only, not one sent since.
CANCEL_SUBMITTED = (
    "UPDATE jobs SET cancelled = ? WHERE id = ? AND state = 'submitted' AND upstream_id = ?"
)
REQUEUE = (
    "UPDATE jobs SET state = 'accepted', upstream_id = NULL, attempts = attempts + 1"
    " WHERE id = ? AND state = 'submitted' AND upstream_id = ? AND NOT cancelled"
)

# The oldest accepted jobs not in :exclude: the first :limit of them as far as they fit
# in :most bytes (the first one whatever its size), and of the next (up to :ask in
# all) those that fit in :room bytes with the ones before (body plus :overhead each;
# length() of a BLOB column reads no content). Each row ends with how many accepted
# jobs there were, up to :ask.
SELECT_ACCEPTED = (
    f"SELECT {JOB_COLUMNS}, total FROM jobs JOIN ("
    " SELECT id, total FROM ("
    "  SELECT id, ROW_NUMBER() OVER up_to AS n, SUM(size) OVER up_to AS running,"
    "   COUNT(*) OVER () AS total FROM ("
    "   SELECT id, length(body) + :overhead AS size FROM jobs WHERE state = 'accepted'"
    "   AND id NOT IN (SELECT value FROM json_each(:exclude)) ORDER BY id LIMIT :ask)"
    "  WINDOW up_to AS (ORDER BY id))"
    " WHERE (n <= :limit AND (n = 1 OR running <= :most)) OR running <= :room"
    ") USING (id) ORDER BY id"
)
# (without the bodies: the harvester needs none, and a job sent again is read anew)
_NO_BODY = JOB_COLUMNS.replace(" body,", " X'' AS body,")
SELECT_SUBMITTED = f"SELECT {_NO_BODY} FROM jobs WHERE state = 'submitted' ORDER BY id"
SELECT_STATE = f"SELECT state FROM jobs WHERE id = :id AND {VISIBLE}"
IS_ACCEPTED = "SELECT 1 FROM jobs WHERE id = :id AND state = 'accepted'"  # any mode, any owner
SELECT_RESULT = f"SELECT state, {RESULT_COLUMNS} FROM jobs WHERE id = :id AND {VISIBLE}"
SELECT_PENDING_JOB = f"SELECT {JOB_COLUMNS} FROM jobs WHERE id = :id AND {PENDING} AND {VISIBLE}"
LIST_DONE = f"SELECT id FROM jobs WHERE state = 'done' AND {VISIBLE} ORDER BY id LIMIT :limit"
LIST_PENDING = f"SELECT id FROM jobs WHERE {PENDING} AND {VISIBLE} ORDER BY id LIMIT :limit"

# Every statement that removes done jobs returns (id, state, size) for each (the
# store keeps the total of stored result bytes); a forget returns a size of 0.
# Deleting removes done jobs and forgets unfinished ones (they run on, result dropped):
# each delete_* method runs its pair in one write.
_DELETE_DONE = f"DELETE FROM jobs WHERE state = 'done' AND {VISIBLE}"
_FORGET = f"UPDATE jobs SET mode = 'true' WHERE {PENDING} AND {VISIBLE}"
_REMOVED = "RETURNING id, state, rsize"
_FORGOTTEN = "RETURNING id, state, 0"
DELETE_DONE = f"{_DELETE_DONE} {_REMOVED}"
FORGET = f"{_FORGET} {_FORGOTTEN}"
DELETE_DONE_ONE = f"{_DELETE_DONE} AND id = :id {_REMOVED}"
FORGET_ONE = f"{_FORGET} AND id = :id {_FORGOTTEN}"
DELETE_DONE_EXPIRED = f"{_DELETE_DONE} AND finished < :stamp {_REMOVED}"
FORGET_EXPIRED = f"{_FORGET} AND created < :stamp {_FORGOTTEN}"


def _finish_set(value: str) -> str:
    """The SET list that makes a job done with a result, each value `value` + its name
    (":" for a parameter, "NEW." in a command's trigger). The result is kept for mode
    store only, and the request is wiped."""
    return (
        f"state = 'done', finished = {value}finished, status = {value}status,"
        f" rheaders = CASE mode WHEN 'store' THEN {value}rheaders END,"
        f" rbody = CASE mode WHEN 'store' THEN {value}rbody END, rsize = {value}rsize,"
        " auth = NULL, headers = NULL, body = NULL"
    )


# A delete run as a job for the job API (records.Answering) finishes that job in the
# write of its deletes: after them with its answer (a job that deleted itself is
# forgotten by then: its answer is dropped, as ArangoDB's), and for /{id} before them
# with the answer for a job :id not there for :viewer (then the answer after them
# finds it done). Each returns finish_job's outcome (mode, user), and a 0 where
# finish_taking has the size of the row it took.
_ANSWER = f"UPDATE jobs SET {_finish_set(':')} WHERE id = :job AND {PENDING}"
_ANSWERED = "RETURNING mode, user, 0"
ANSWER = f"{_ANSWER} {_ANSWERED}"
_SEEN = f"EXISTS (SELECT 1 FROM jobs WHERE id = :id AND {VISIBLE})"
ANSWER_UNLESS_SEEN = f"{_ANSWER} AND NOT {_SEEN} {_ANSWERED}"

# Retention: only done jobs, oldest-finished first, at most :limit per statement so
# that one sweep never holds the writer (and every accept behind it) for long.
OLDEST_FINISHED = f"SELECT min(finished) FROM {DONE_BY_AGE}"
EXPIRE = (
    "DELETE FROM jobs WHERE id IN ("
    f"SELECT id FROM {DONE_BY_AGE} AND finished < :stamp ORDER BY finished, id LIMIT :limit"
    f") {_REMOVED}"
)
# The oldest done jobs whose sizes, added up oldest first, first reach :excess.
EVICT = (
    "DELETE FROM jobs WHERE id IN (SELECT id FROM ("
    "SELECT id, rsize, sum(rsize) OVER (ORDER BY finished, id ROWS UNBOUNDED PRECEDING) AS upto"
    f" FROM (SELECT id, rsize, finished FROM {DONE_BY_AGE} ORDER BY finished, id LIMIT :limit)"
    f") WHERE upto - rsize < :excess) {_REMOVED}"
)


# -- commands ----------------------------------------------------------------------------
#
# The writes the dispatcher, the harvester and the facade make for every job (mark it
# submitted, store its result, delete a fetched result) are commands: an INSERT into
# a view of the writer's connection, whose trigger does the write and records in
# ``outcome`` what RETURNING would give, under the write's number in its batch (k).
# The writer runs the consecutive commands of a batch that share a view as one
# multi-row INSERT and reads every outcome of the batch at once (storage.batch,
# Want.OUTCOME): a few statements per batch where one per job, each a wait for
# Python's interpreter lock on a busy proxy, took most of a batch's time. Each row
# runs its trigger in turn, so a batch does exactly what the writes would one by one.
# A row of NULLs does nothing (no job has the id NULL): the writer fills statements up
# with those.
# The views and triggers are TEMP, as ``outcome`` (storage.batch.OUTCOME_TABLE):
# created by the writer's connection when it opens (``COMMANDS``), never in the file.


def _command(name: str, columns: str, body: str) -> tuple[str, str, str, str]:
    """The view and trigger of command `name` with these `columns` (after k), the
    INSERT that runs it, and that INSERT's VALUES group."""
    count = len(columns.split(", ")) + 1
    return (
        f"CREATE TEMP VIEW {name} (k, {columns}) AS SELECT {', '.join(['NULL'] * count)} WHERE 0",
        f"CREATE TEMP TRIGGER {name} INSTEAD OF INSERT ON {name} BEGIN {body} END",
        f"INSERT INTO {name} (k, {columns}) VALUES ({', '.join(['?'] * count)})",
        f"({', '.join(['?'] * count)})",
    )


# accepted -> submitted with ArangoDB's job id; outcome (1) if it was still accepted.
_MARKED = "WHERE id = NEW.id AND state = 'accepted'"
_MARK = _command(
    "mark_submitted",
    "id, upstream_id, cancelled",
    f"INSERT INTO outcome (k, a) SELECT NEW.k, 1 FROM jobs {_MARKED};"
    " UPDATE jobs SET state = 'submitted', upstream_id = NEW.upstream_id,"
    f" cancelled = NEW.cancelled {_MARKED};",
)
MARK_SUBMITTED, MARK_SUBMITTED_VALUES = _MARK[2:]

# -> done with its result, wiping the request. state1, state2: the states it may be in
# (a single one given twice); upstream_id: its id at ArangoDB it must still have (NULL:
# any). A forgotten job's result is not written at all: the row is deleted right after
# (the schema's trigger) and must not need a page more on a full disk first. Outcome
# (mode, user): whether a result was kept, and whose.
_FINISHED = (
    "WHERE id = NEW.id AND state IN (NEW.state1, NEW.state2)"
    " AND (NEW.upstream_id IS NULL OR upstream_id = NEW.upstream_id)"
)
_FINISH_COLUMNS = "id, state1, state2, upstream_id, finished, status, rheaders, rbody, rsize"
_FINISH_UPDATE = f"UPDATE jobs SET {_finish_set('NEW.')} {_FINISHED};"
_FINISH = _command(
    "finish_job",
    _FINISH_COLUMNS,
    f"INSERT INTO outcome (k, a, b) SELECT NEW.k, mode, user FROM jobs {_FINISHED};"
    + _FINISH_UPDATE,
)
FINISH, FINISH_VALUES = _FINISH[2:]

# finish_job, taking with it the result of job `taken` (a fetch run as a job: its result
# is that one's, JobStore.take_result(hold=True)): in one write, so that no crash leaves
# the result in neither row, and the taken row's pages are free before the new result
# needs them (a full store). The taken row goes only if the job finishes. Outcome (mode,
# user, the taken row's size if it went).
_TAKEN_ROW = "WHERE id = NEW.taken AND state = 'done'"
_FINISH_TAKING = _command(
    "finish_taking",
    f"{_FINISH_COLUMNS}, taken",
    "INSERT INTO outcome (k, a, b, c) SELECT NEW.k, mode, user,"
    f" (SELECT rsize FROM jobs {_TAKEN_ROW}) FROM jobs {_FINISHED};"
    f" DELETE FROM jobs {_TAKEN_ROW} AND EXISTS (SELECT 1 FROM jobs {_FINISHED});" + _FINISH_UPDATE,
)
FINISH_TAKING, FINISH_TAKING_VALUES = _FINISH_TAKING[2:]

# A result its client fetched (JobStore.take_result): it was visible to that client
# when claimed, and a done job's owner and mode never change. Outcome (id, state, size).
_TAKEN = "WHERE id = NEW.id AND state = 'done'"
_DELETE_TAKEN = _command(
    "delete_taken",
    "id",
    f"INSERT INTO outcome (k, a, b, c) SELECT NEW.k, id, state, rsize FROM jobs {_TAKEN};"
    f" DELETE FROM jobs {_TAKEN};",
)
DELETE_TAKEN, DELETE_TAKEN_VALUES = _DELETE_TAKEN[2:]

COMMANDS = (*_MARK[:2], *_FINISH[:2], *_FINISH_TAKING[:2], *_DELETE_TAKEN[:2])
