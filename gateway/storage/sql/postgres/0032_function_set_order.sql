-- A marker, changing nothing but a comment (review-rec REC-4). Review-once F1
-- rewrote functions (gateway_answer_id, gateway_settle, gateway_settle_many,
-- gateway_supersede) and added no migration, so a pod of the release before it,
-- restarting during a rolling update, found every migration applied and a
-- function set not its own, and put its own back for every pod (answers under
-- an id another request's answer holds were then dropped uncharged). A
-- migration number is what orders releases: `migrate` refuses a database
-- holding one it does not know, and changes nothing. So every change to
-- functions/ ships with a migration, an empty one like this if nothing else
-- changes (tests/test_deploy.py checks it; docs/deploy.md, "Upgrading").
COMMENT ON TABLE schema_function_set IS
    'The gateway_* functions installed (a hash of gateway/storage/sql/postgres/functions). '
    'A release that changes them adds a migration, so that an older release refuses this '
    'database instead of putting its own functions back (docs/deploy.md).';
