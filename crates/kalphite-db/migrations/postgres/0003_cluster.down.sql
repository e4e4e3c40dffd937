DROP TABLE kalphite_nodes;
DROP TABLE kalphite_rooms;
