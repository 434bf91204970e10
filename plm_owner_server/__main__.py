from plm_owner_server.cli import main

main()
