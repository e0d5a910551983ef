-- m2mgw module database on PostgreSQL, schema level 4: the application
-- listener lists the modules of an application.

CREATE INDEX module_apps_app ON module_apps (app, module_id);
